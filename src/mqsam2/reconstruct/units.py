"""Which modules of SAM2 form a reconstruction unit, in the order they are reconstructed (method.md §5).

A unit owns the quantized layers inside it that no earlier unit owns, so a coarse unit such as the whole mask
decoder reconstructs only its small heads once its transformer blocks are done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mqsam2.quant.modules import QuantLayerMixin
from mqsam2.quant.quantizer import ActQuantizer
from mqsam2.quant.swap import quantizable_layers, quantized_layers

UNIT_MODES = ("qdrop", "brecq", "adaround", "lsc", "none")
TRUNK_BLOCK = "image_encoder.trunk.blocks."
MEMORY_LAYER = "memory_attention.layers."
DECODER_BLOCK = "sam_mask_decoder.transformer.layers."
FINAL_ATTENTION = "sam_mask_decoder.transformer.final_attn_token_to_image"

# How a unit's call follows from the previous unit's call (args, kwargs) and output, as SAM2's forward makes it.
Link = Callable[[tuple, dict, Any], tuple[tuple, dict]]


def next_trunk_block(args: tuple, kwargs: dict, output: Any) -> tuple[tuple, dict]:
    """Hiera: `x = blk(x)`."""
    return (output,), {}


def next_memory_layer(args: tuple, kwargs: dict, output: Any) -> tuple[tuple, dict]:
    """MemoryAttention: `output = layer(tgt=output, memory=memory, pos=memory_pos, query_pos=curr_pos, ...)`."""
    return (), {**kwargs, "tgt": output}


def next_decoder_block(args: tuple, kwargs: dict, output: Any) -> tuple[tuple, dict]:
    """TwoWayTransformer: `queries, keys = layer(queries=queries, keys=keys, query_pe=..., key_pe=...)`."""
    queries, keys = output
    return (), {**kwargs, "queries": queries, "keys": keys}


def final_attention(args: tuple, kwargs: dict, output: Any) -> tuple[tuple, dict]:
    """TwoWayTransformer: `final_attn_token_to_image(q=queries + point_embedding, k=keys + image_pe, v=keys)`."""
    queries, keys = output
    return (), {"q": queries + kwargs["query_pe"], "k": keys + kwargs["key_pe"], "v": keys}


@dataclass
class Unit:
    """One reconstruction step: the module to run, the layers it learns, how its data is produced."""

    name: str
    module: nn.Module
    layers: dict[str, QuantLayerMixin] = field(default_factory=dict)
    encoder_only: bool = False  # its inputs come from the image encoder alone (no video run needed)
    channels_first: bool = False  # outputs are NCHW, so channels are dim 1 in the loss
    batchable: bool = True  # every tensor input carries the sample batch in dim 0
    follows: str | None = None  # the unit whose call and output make this unit's call (a chain of blocks)
    link: Link | None = None  # how, given `follows`
    gathers: tuple[
        str, ...
    ] = ()  # units whose outputs are this unit's input (the neck reads Hiera's stage ends)

    @property
    def video_loop(self) -> bool:
        """Fed by the tracking loop, where every such unit's outputs reach every other one's inputs on later
        frames (through the memory bank and object pointers): only a model pass gives its exact inputs."""
        return not self.encoder_only

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
    units = []
    for name, mine, channels_first, batchable in _owned_layers(model, quantized_layers(model), mode):
        link = _link(units[-1].name, name) if units and mode != "adaround" else None
        units.append(
            Unit(
                name=name,
                module=model.get_submodule(name),
                layers=mine,
                encoder_only=name.startswith("image_encoder."),
                channels_first=channels_first,
                batchable=batchable,
                follows=units[-1].name if link else None,
                link=link,
                gathers=_stage_ends(model, units) if name == "image_encoder.neck" else (),
            )
        )
    return units


def unit_names(float_model: nn.Module, mode: str, keep_fp: tuple[str, ...]) -> list[str]:
    """The names `reconstruction_units` will give the model once quantized with `keep_fp`: lets a config's
    unit list be checked before any work is done."""
    return [name for name, *_ in _owned_layers(float_model, quantizable_layers(float_model, keep_fp), mode)]


def _owned_layers(model: nn.Module, layers: dict[str, nn.Module], mode: str):
    """(unit name, the layers it owns, channels_first, batchable) in reconstruction order."""
    if mode == "none":
        return
    if mode == "adaround":
        specs = [(name, isinstance(layer, nn.Conv2d), True) for name, layer in layers.items()]
    else:
        specs = [(name, cf, b) for name, cf, b in _block_units(model) if _has_submodule(model, name)]
    owned = set()
    for name, channels_first, batchable in specs:
        mine = {
            layer_name: layer
            for layer_name, layer in layers.items()
            if (layer_name == name or layer_name.startswith(name + ".")) and layer_name not in owned
        }
        if mine:
            owned.update(mine)
            yield name, mine, channels_first, batchable


def _link(previous: str, name: str) -> Link | None:
    """The link from the previous unit when SAM2 calls this unit on that unit's output, else None."""
    chains = (
        (TRUNK_BLOCK, next_trunk_block),
        (MEMORY_LAYER, next_memory_layer),
        (DECODER_BLOCK, next_decoder_block),
    )
    for prefix, link in chains:
        if name.startswith(prefix) and previous.startswith(prefix):
            return link
    if name == FINAL_ATTENTION and previous.startswith(DECODER_BLOCK):
        return final_attention
    return None


def _stage_ends(model: nn.Module, units: list[Unit]) -> tuple[str, ...]:
    """The Hiera blocks whose outputs the neck reads (every stage's last block, or only the last one), when
    each of them is a unit; else () and the neck is captured by a pass of the image encoder."""
    trunk = model.image_encoder.trunk
    ends = trunk.stage_ends if trunk.return_interm_layers else trunk.stage_ends[-1:]
    names = tuple(f"{TRUNK_BLOCK}{i}" for i in ends)
    return names if set(names) <= {unit.name for unit in units} else ()


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
