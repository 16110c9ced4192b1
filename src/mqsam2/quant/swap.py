"""`quantize(model, config)`: swap SAM2's Linear/Conv2d (and optionally attention) for quantized modules in
place, then `calibration(model)` initialises every quantizer from observed data."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam.transformer import Attention
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import check_bits
from mqsam2.quant.modules import (
    FLOAT_TO_QUANT,
    PROBABILITY_QUANTIZERS,
    QuantAttentionMixin,
    QuantLayerMixin,
    quant_attention_class,
)
from mqsam2.quant.quantizer import FakeQuantizer, WeightQuantizer

log = logging.getLogger(__name__)

# method.md §2: the first layer, the raw-mask convolutions and the mask decoder's output heads stay in float.
DEFAULT_KEEP_FP: tuple[str, ...] = (
    "image_encoder.trunk.patch_embed.proj",
    "memory_encoder.mask_downsampler.encoder.0",
    "sam_prompt_encoder.mask_downscaling.0",
    "mask_downsample",
    "sam_mask_decoder.output_hypernetworks_mlps.*.layers.2",
    "sam_mask_decoder.iou_prediction_head.layers.2",
    "sam_mask_decoder.pred_obj_score_head.layers.2",
    "sam_mask_decoder.output_upscaling.3",
)
ATTENTION_CLASSES: tuple[type[nn.Module], ...] = (MultiScaleAttention, Attention)
ObserverName = Literal["minmax", "percentile", "mse", "omse"]  # mqsam2.quant.observers.OBSERVERS


@dataclass
class QuantConfig:
    """How to quantize: uniform `bits` or a per-layer `plan`, observers, float layers, attention matmuls.

    A plan maps layer names to bit-widths (Eq. 6 output); layers it does not name get `bits`. Weights and the
    layer's input activations share the width unless `act_plan` (per layer) or `act_bits` (all layers) sets
    the activations' own, or `weight_only` leaves them float. `act_observer: dynamic` is the naive baseline:
    each live input quantized with its own min-max range, nothing calibrated. With `quantize_attention`, the
    softmax probabilities use a `uniform` quantizer or PTQ4SAM's `log2` one (`attention_probs`).
    """

    bits: int = 8
    act_bits: int | None = None
    plan: Mapping[str, int] | None = None
    act_plan: Mapping[str, int] | None = None
    weight_only: bool = False
    weight_observer: ObserverName = "minmax"
    act_observer: ObserverName = "minmax"
    percentile: float = 99.99
    mse_p: float = 2.4
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    quantize_attention: bool = False
    attention_bits: int | None = None
    attention_probs: str = "uniform"
    observer_sample_size: int = 1 << 20

    def __post_init__(self) -> None:
        check_bits(self.bits, "quant.bits")
        if self.attention_probs not in PROBABILITY_QUANTIZERS:
            raise MQSAM2Error(
                f"attention_probs {self.attention_probs!r} is not a quantizer kind: use one of "
                f"{', '.join(PROBABILITY_QUANTIZERS)}"
            )
        for key in ("act_bits", "attention_bits"):
            if getattr(self, key) is not None:
                check_bits(getattr(self, key), f"quant.{key}")
        for key in ("plan", "act_plan"):
            for name, bits in (getattr(self, key) or {}).items():
                check_bits(bits, f"quant.{key} entry {name}")
        self.keep_fp = tuple(self.keep_fp)


def _kept_fp(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def quantizable_layers(model: nn.Module, keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP) -> dict[str, nn.Module]:
    """Every Linear/Conv2d (quantized or not) that the config would quantize, in network order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, tuple(FLOAT_TO_QUANT)) and not _kept_fp(name, keep_fp)
    }


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Swap layers for quantized ones in place (uncalibrated) and return the model."""
    config = config or QuantConfig()
    layers = quantizable_layers(model, config.keep_fp)
    already = [name for name, layer in layers.items() if isinstance(layer, QuantLayerMixin)]
    if already:
        raise MQSAM2Error(
            f"model is already quantized ({already[0]} ...): build a fresh model to re-quantize"
        )
    kept = set(quantizable_layers(model)) - set(layers)  # a plan may name layers that keep_fp leaves in float
    unknown = sorted((set(config.plan or {}) | set(config.act_plan or {})) - set(layers) - kept)
    if unknown:
        raise MQSAM2Error(
            f"plan names {len(unknown)} layer(s) that are not quantizable in this model: {', '.join(unknown)}"
        )
    for name, layer in layers.items():
        bits = (config.plan or {}).get(name, config.bits)
        act_bits = (config.act_plan or {}).get(name, config.act_bits or bits)
        act_bits = None if config.weight_only else act_bits
        quant = FLOAT_TO_QUANT[type(layer)].from_float(layer, bits, act_bits)
        _replace(model, name, quant)
    if config.quantize_attention:
        attention_bits = config.attention_bits or config.act_bits or config.bits
        for module in list(model.modules()):
            if isinstance(module, ATTENTION_CLASSES) and not isinstance(module, QuantAttentionMixin):
                module.__class__ = quant_attention_class(type(module))
                module.init_attention_quantizers(attention_bits, config.attention_probs)
    for name, quantizer in model.named_modules():
        if isinstance(quantizer, FakeQuantizer):
            quantizer.name = name
    model.mqsam2_quant_config = config
    n_attention = sum(isinstance(m, QuantAttentionMixin) for m in model.modules())
    log.info("quantized %d layers and %d attention modules", len(layers), n_attention)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


def fake_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizer)}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLayerMixin) for m in model.modules())


def bit_plan(model: nn.Module) -> dict[str, int]:
    """{layer: weight bits} of a quantized model, in network order."""
    return {name: layer.bits for name, layer in quantized_layers(model).items()}


# bytes of what a layer's integer weight codes need besides the codes: an fp16 scale and zero per channel
_CHANNEL_BYTES = 4


def weight_megabytes(model: nn.Module, float_bytes: int = 2) -> float:
    """The model's weights as stored (MB, 10^6 bytes): each quantized layer's weight at its bit-width plus an
    fp16 scale and zero per output channel, every other parameter (biases, float layers) at `float_bytes`
    (fp16 by default, as the checkpoints ship). Equal-budget comparisons need the size, not only the averages."""
    quantizer_params = {id(p) for q in fake_quantizers(model).values() for p in q.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in quantizer_params) * float_bytes
    for layer in quantized_layers(model).values():
        weight = layer.weight
        total += weight.numel() * (layer.bits / 8 - float_bytes) + weight.shape[0] * _CHANNEL_BYTES
    return total / 1e6


@torch.no_grad()
def init_weight_quantizers(model: nn.Module, config: QuantConfig) -> None:
    """Data-free: each weight quantizer observes its own weight once."""
    for layer in quantized_layers(model).values():
        quantizer = layer.weight_quantizer
        quantizer.attach_observer(
            config.weight_observer, percentile=config.percentile, p=config.mse_p, sample_size=None
        )
        quantizer.observer.update(layer.weight)
        quantizer.finish_observing()


@contextlib.contextmanager
def calibration(model: nn.Module, config: QuantConfig | None = None) -> Iterator[None]:
    """Run float forward passes inside the block; on exit every quantizer holds its calibrated range.

    Activations are observed with all quantizers off (the float network's statistics). A layer whose input
    the calibration data never reached goes back to floating point with a warning that names it (a plan that
    the user wrote is checked earlier, by the importance stage). With the `dynamic` act observer nothing is
    observed.
    """
    config = config or getattr(model, "mqsam2_quant_config", QuantConfig())
    init_weight_quantizers(model, config)
    act_quantizers = {
        name: q for name, q in fake_quantizers(model).items() if not isinstance(q, WeightQuantizer)
    }
    if config.act_observer == "dynamic":
        for quantizer in act_quantizers.values():
            quantizer.make_dynamic()
        yield
        return
    for quantizer in fake_quantizers(model).values():
        quantizer.enabled = False
    for quantizer in act_quantizers.values():
        quantizer.attach_observer(
            config.act_observer,
            percentile=config.percentile,
            p=config.mse_p,
            sample_size=config.observer_sample_size,
        )
        quantizer.observing = True
    try:
        yield
    finally:
        unseen = [name for name, q in act_quantizers.items() if not q.finish_observing()]
        for quantizer in fake_quantizers(model).values():
            quantizer.enabled = True
    _keep_unreached_in_float(model, unseen, config)


def _keep_unreached_in_float(model: nn.Module, unseen: list[str], config: QuantConfig) -> None:
    """Layers whose input quantizer saw no data go back to float (named in a warning); the attention matmul
    quantizers that saw none are only listed, since their module never ran."""
    suffix = ".input_quantizer"
    layers = [name.removesuffix(suffix) for name in unseen if name.endswith(suffix)]
    for name in layers:
        _replace(model, name, model.get_submodule(name).to_float())
    if layers:  # recorded, so a saved model is rebuilt with the same structure
        model.mqsam2_quant_config = dataclasses.replace(config, keep_fp=(*config.keep_fp, *layers))
        log.warning(
            "no calibration input reached %d layer(s), which stay in floating point: %s",
            len(layers),
            ", ".join(layers),
        )
    others = [name for name in unseen if not name.endswith(suffix)]
    if others:
        log.warning(
            "%d attention quantizer(s) saw no calibration data (e.g. %s): feed data that exercises them",
            len(others),
            others[0],
        )


def set_quantization(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Toggle fake-quant (e.g. BRECQ's weights-first stage runs activations in float)."""
    for quantizer in fake_quantizers(model).values():
        quantizer.enabled = weights if isinstance(quantizer, WeightQuantizer) else activations
