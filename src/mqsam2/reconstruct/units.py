"""Which modules of SAM2 form a reconstruction unit, in the order they are reconstructed (method.md §5).

A unit owns the quantized layers inside it that no earlier unit owns, so a coarse unit such as the whole mask
decoder reconstructs only its small heads once its transformer blocks are done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mqsam2.quant.modules import QuantLayerMixin
from mqsam2.quant.quantizer import ActQuantizer
from mqsam2.quant.swap import quantized_layers

UNIT_MODES = ("qdrop", "brecq", "adaround", "lsc", "none")
TRUNK_BLOCK = "image_encoder.trunk.blocks."


@dataclass
class Unit:
    """One reconstruction step: the module to run, the layers it learns, how its data is produced."""

    name: str
    module: nn.Module
    layers: dict[str, QuantLayerMixin] = field(default_factory=dict)
    encoder_only: bool = False  # its inputs come from the image encoder alone (no video run needed)
    channels_first: bool = False  # outputs are NCHW, so channels are dim 1 in the loss
    batchable: bool = True  # every tensor input carries the sample batch in dim 0
    follows: str | None = None  # the unit whose output is this unit's only input (a chain of blocks)

    @property
    def act_quantizers(self) -> dict[str, ActQuantizer]:
        """Calibrated activation quantizers this unit learns: its layers' inputs and the matmul operands of
        attention modules whose projections it owns (not those of earlier units nested inside it)."""
        owned = set(self.layers)
        found = {}
        for name, module in self.module.named_modules():
            if not isinstance(module, ActQuantizer) or not module.initialized:
                continue
            parent = f"{self.name}.{name}".rpartition(".")[0]
            if parent in owned or any(layer.rpartition(".")[0] == parent for layer in owned):
                found[name] = module
        return found


def _block_units(model: nn.Module) -> list[tuple[str, bool, bool]]:
    """(module name, channels_first, batchable) for SAM2's blocks and heads, in network order."""
    trunk = [
        (f"image_encoder.trunk.blocks.{i}", False, True) for i in range(len(model.image_encoder.trunk.blocks))
    ]
    memory_attention = [
        (f"memory_attention.layers.{i}", False, True) for i in range(len(model.memory_attention.layers))
    ]
    decoder = [
        (f"sam_mask_decoder.transformer.layers.{i}", False, True)
        for i in range(len(model.sam_mask_decoder.transformer.layers))
    ]
    return [
        *trunk,
        ("image_encoder.neck", True, True),
        *memory_attention,
        ("memory_encoder", True, True),
        *decoder,
        ("sam_mask_decoder.transformer.final_attn_token_to_image", False, True),
        ("sam_mask_decoder", True, False),
        ("obj_ptr_proj", False, True),
        ("obj_ptr_tpos_proj", False, True),
        ("sam_prompt_encoder.mask_downscaling", True, True),
    ]


def reconstruction_units(model: nn.Module, mode: str = "qdrop") -> list[Unit]:
    """Units of a quantized SAM2: blocks for qdrop/brecq/lsc, single layers for adaround, none for `none`."""
    if mode not in UNIT_MODES:
        raise ValueError(f"unknown reconstruction mode {mode!r}: use one of {', '.join(UNIT_MODES)}")
    layers = quantized_layers(model)
    if mode == "none":
        return []
    if mode == "adaround":
        specs = [(name, isinstance(layer, nn.Conv2d), True) for name, layer in layers.items()]
    else:
        specs = [(name, cf, b) for name, cf, b in _block_units(model) if _has_submodule(model, name)]
    units, owned = [], set()
    for name, channels_first, batchable in specs:
        mine = {
            layer_name: layer
            for layer_name, layer in layers.items()
            if (layer_name == name or layer_name.startswith(name + ".")) and layer_name not in owned
        }
        if not mine:
            continue
        owned.update(mine)
        chained = units and name.startswith(TRUNK_BLOCK) and units[-1].name.startswith(TRUNK_BLOCK)
        units.append(
            Unit(
                name=name,
                module=model.get_submodule(name),
                layers=mine,
                encoder_only=name.startswith("image_encoder."),
                channels_first=channels_first,
                batchable=batchable,
                follows=units[-1].name if chained else None,
            )
        )
    return units


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
