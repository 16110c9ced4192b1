"""Quantization of SAM2: Eq. 1 affine quantizer, observers, quantized modules and the in-place swap."""

from mqsam2.quant.affine import dequantize_affine, fake_quantize, params_from_range, quantize_affine
from mqsam2.quant.modules import QuantAttentionMixin, QuantConv2d, QuantLayerMixin, QuantLinear
from mqsam2.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver, make_observer
from mqsam2.quant.quantizer import ActQuantizer, FakeQuantizer, WeightQuantizer
from mqsam2.quant.swap import (
    DEFAULT_KEEP_FP,
    QuantConfig,
    bit_plan,
    calibration,
    fake_quantizers,
    is_quantized,
    quantizable_layers,
    quantize,
    quantized_layers,
    set_quantization,
    weight_megabytes,
)

__all__ = [
    "DEFAULT_KEEP_FP",
    "ActQuantizer",
    "FakeQuantizer",
    "MSEObserver",
    "MinMaxObserver",
    "PercentileObserver",
    "QuantAttentionMixin",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayerMixin",
    "QuantLinear",
    "WeightQuantizer",
    "bit_plan",
    "calibration",
    "dequantize_affine",
    "fake_quantize",
    "fake_quantizers",
    "is_quantized",
    "make_observer",
    "params_from_range",
    "quantizable_layers",
    "quantize",
    "quantize_affine",
    "quantized_layers",
    "set_quantization",
    "weight_megabytes",
]
