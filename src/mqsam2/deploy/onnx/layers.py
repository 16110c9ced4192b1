"""Export-ready replacements of the quantized layers: the same arithmetic as the fake-quant layers, written with
the custom ops of `mqsam2.deploy.onnx.ops` so that the ONNX graph carries integer codes and QDQ nodes.

What each layer of a bit plan becomes (docs/deployment.md has the reading):

| quantized layer | ONNX | weight in the file |
|---|---|---|
| Linear, 2-8 bits (`low_bit_kernel="int8"`) | DequantizeLinear -> MatMul (ORT: MatMulIntegerToFloat) | uint8 codes, per-channel scale + zero-point |
| Linear, 2-4 bits (`low_bit_kernel="int4"`) | com.microsoft MatMulNBits, 4-bit | codes two per byte, one block size per layer |
| Conv2d, 2-8 bits | DequantizeLinear -> Conv | uint8 codes, per-channel scale + zero-point |
| activation quantizer of a layer input or attention operand | [Clip ->] QuantizeLinear -> DequantizeLinear | calibrated scale, zero-point |

Codes are never re-quantized: a b-bit code (0..2^b-1) is stored as that integer in a uint8 (or a 4-bit nibble),
its zero-point likewise, so 2- and 3-bit codes run in the 4-bit kernel and 5- to 7-bit codes in the 8-bit one,
exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mqsam2.deploy.kernels import check_deployable
from mqsam2.deploy.onnx.ops import NBITS, dequantize_weight, fake_quantize_activation, matmul_nbits
from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import qmax
from mqsam2.quant.modules import QuantAttentionMixin, QuantLayerMixin
from mqsam2.quant.quantizer import ActQuantizer
from mqsam2.quant.swap import quantized_layers

NBITS_BLOCK_SIZES = (256, 128, 64, 32, 16)  # MatMulNBits' block sizes (powers of 2, 16..256 on the CPU)


@dataclass(frozen=True)
class OnnxExportConfig:
    """How the quantized layers are written.

    `low_bit_kernel`: "int8" runs 2-4-bit Linear layers as 8-bit QDQ like the wider ones (fastest on x86 CPUs
    at SAM2's token counts); "int4" writes them as 4-bit MatMulNBits (half the bytes; ONNX Runtime's kernel is
    built for few rows and is slower at SAM2's). `accuracy_level`: MatMulNBits' compute type: 0 (the default)
    multiplies in fp32 and is exact; 4 re-quantizes the activations to int8 per block inside the kernel, an
    extra rounding the fake-quant model does not have. `multimask_output`: the decoder returns sam2's three
    masks instead of the single best one.
    """

    low_bit_kernel: Literal["int8", "int4"] = "int8"
    accuracy_level: int = 0
    multimask_output: bool = False

    def __post_init__(self) -> None:
        if self.low_bit_kernel not in ("int8", "int4"):
            raise MQSAM2Error(f"low_bit_kernel={self.low_bit_kernel!r}: use 'int8' or 'int4'")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise MQSAM2Error(f"accuracy_level={self.accuracy_level}: use 0 (fp32) .. 4 (int8)")


@dataclass
class OnnxLayerReport:
    """Which ONNX construct each quantized layer became, and why a layer did not get the one it asked for."""

    kernels: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.kernels.values()))


class ActivationQDQ(nn.Module):
    """A calibrated per-tensor activation quantizer: QuantizeLinear -> DequantizeLinear in the graph. One that
    saw no calibration data raises when a traced forward reaches it (parts no graph uses need none)."""

    def __init__(self, scale: float, zero_point: int, bits: int, name: str = "", calibrated: bool = True):
        super().__init__()
        self.scale, self.zero_point, self.bits = scale, zero_point, bits
        self.name, self.calibrated = name, calibrated

    @classmethod
    def from_quantizer(cls, quantizer: ActQuantizer) -> ActivationQDQ:
        return cls(
            float(quantizer.scale),
            int(quantizer.zero_point),
            quantizer.bits,
            quantizer.name,
            bool(quantizer.initialized),
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.6g}, zero_point={self.zero_point}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise MQSAM2Error(
                f"quantizer {self.name or '(unnamed)'} was never calibrated: calibrate on data that exercises "
                "it before exporting"
            )
        return fake_quantize_activation(x, self.scale, self.zero_point, qmax(self.bits))


def _input_qdq(layer: QuantLayerMixin) -> ActivationQDQ | None:
    return None if layer.input_quantizer is None else ActivationQDQ.from_quantizer(layer.input_quantizer)


def _bias(layer: nn.Module) -> nn.Parameter | None:
    return None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)


# x86 CPUs without VNNI multiply uint8 activations by int8 weights with vpmaddubsw, which adds two products in a
# saturating int16: exact only while 2 * (largest activation code) * (largest weight code) fits in 32767.
_INT16_MAX = 32767


def code_dtype(bits: int, act_bits: int | None) -> torch.dtype:
    """int8 for codes that ONNX Runtime's faster uint8 x int8 GEMM multiplies exactly (0..2^b-1 fits int8 and
    no int16 pair sum can saturate), else uint8 (its uint8 x uint8 GEMM, exact for any codes). Either way the
    stored integers are the codes themselves."""
    act_max = qmax(act_bits) if act_bits is not None else 255
    exact_signed = bits <= 7 and 2 * act_max * qmax(bits) <= _INT16_MAX
    return torch.int8 if exact_signed else torch.uint8


def _codes(layer: QuantLayerMixin, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    return layer.weight_quantizer.codes(layer.weight.detach()).to(dtype)


def _zero_point(layer: QuantLayerMixin, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    return layer.weight_quantizer.zero_point.detach().to(dtype)


class _QDQLayer(nn.Module):
    """What a QDQ layer holds: the integer codes (transposed for a Linear, so DequantizeLinear feeds MatMul
    directly), the per-output-channel scale and zero-point, the bias and the input's QDQ."""

    def __init__(self, layer: QuantLayerMixin, transpose: bool):
        super().__init__()
        self.bits = layer.bits
        dtype = code_dtype(layer.bits, layer.act_bits)
        codes = _codes(layer, dtype)
        self.register_buffer("codes", codes.t().contiguous() if transpose else codes)
        self.register_buffer("scale", layer.weight_quantizer.scale.detach().float().clone())
        self.register_buffer("zero_point", _zero_point(layer, dtype))
        self.bias = _bias(layer)
        self.input_qdq = _input_qdq(layer)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_qdq is None else self.input_qdq(x)


class QDQLinear(_QDQLayer):
    """y = QDQ(x) @ DQ(codes^T) + bias: codes stored transposed ([K, N], per-channel axis 1) so that the
    DequantizeLinear feeds MatMul directly, the pattern ONNX Runtime fuses into its integer GEMM."""

    def __init__(self, layer: QuantLayerMixin):
        super().__init__(layer, transpose=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(
            self.quantized_input(x), dequantize_weight(self.codes, self.scale, self.zero_point, 1)
        )
        return y if self.bias is None else y + self.bias


def nbits_block_size(in_features: int) -> int | None:
    """The largest MatMulNBits block size that divides K (every block of a row shares the row's scale)."""
    return next((size for size in NBITS_BLOCK_SIZES if in_features % size == 0), None)


def pack_nbits(codes: torch.Tensor, block_size: int) -> torch.Tensor:
    """Codes [N, K] (0..15) in MatMulNBits' layout [N, K / block, block / 2]: code j of a block in byte j // 2,
    the low nibble for even j."""
    rows, in_features = codes.shape
    pairs = codes.to(torch.uint8).reshape(rows, in_features // block_size, block_size // 2, 2)
    return pairs[..., 0] | pairs[..., 1] << 4


def pack_nbits_zero_points(zero_point: torch.Tensor, blocks: int) -> torch.Tensor:
    """The row's zero-point for each of its blocks, two blocks per byte (low nibble first): [N, ceil(blocks/2)]."""
    per_block = zero_point.to(torch.uint8)[:, None].expand(-1, blocks + blocks % 2)
    return per_block[:, 0::2] | per_block[:, 1::2] << 4


class NBitsLinear(nn.Module):
    """y = MatMulNBits(QDQ(x), 4-bit codes) + bias; each row's scale and zero-point repeat over its blocks."""

    def __init__(self, layer: QuantLayerMixin, block_size: int, accuracy_level: int):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.block_size, self.accuracy_level = layer.bits, block_size, accuracy_level
        blocks = self.in_features // block_size
        quantizer = layer.weight_quantizer
        self.register_buffer("packed", pack_nbits(_codes(layer), block_size))
        scales = quantizer.scale.detach().float()[:, None].expand(-1, blocks)
        self.register_buffer("scales", scales.reshape(-1).contiguous())
        self.register_buffer("zero_points", pack_nbits_zero_points(_zero_point(layer), blocks))
        self.bias = _bias(layer)
        self.input_qdq = _input_qdq(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        y = matmul_nbits(
            x,
            self.packed,
            self.scales,
            self.zero_points,
            self.in_features,
            self.out_features,
            self.block_size,
            self.accuracy_level,
        )
        return y if self.bias is None else y + self.bias


class QDQConv2d(_QDQLayer):
    """F.conv2d(QDQ(x), DQ(codes)): codes [O, I / groups, kh, kw] with per-output-channel parameters."""

    def __init__(self, layer: QuantLayerMixin):
        if layer.padding_mode != "zeros":
            raise MQSAM2Error(f"Conv2d with padding_mode={layer.padding_mode!r} cannot be exported")
        super().__init__(layer, transpose=False)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_weight(self.codes, self.scale, self.zero_point, 0)
        return F.conv2d(
            self.quantized_input(x), weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def _export_layer(layer: QuantLayerMixin, config: OnnxExportConfig) -> tuple[nn.Module, str, str | None]:
    """(replacement, kernel, why the layer did not get the kernel its width selects, or None)."""
    if not isinstance(layer, nn.Linear):
        return QDQConv2d(layer), "qdq-conv", None
    if config.low_bit_kernel == "int4" and layer.bits <= NBITS:
        block_size = nbits_block_size(layer.in_features)
        if block_size is not None:
            return NBitsLinear(layer, block_size, config.accuracy_level), "matmulnbits-int4", None
        reason = f"in_features {layer.in_features} has no power-of-2 divisor >= 16 (MatMulNBits' blocks)"
        return QDQLinear(layer), "qdq-int8", reason
    return QDQLinear(layer), "qdq-int8", None


def _in(name: str, components: tuple[str, ...] | None) -> bool:
    return components is None or name.split(".")[0] in components


def to_export_layers(
    model: nn.Module, config: OnnxExportConfig, components: tuple[str, ...] | None = None
) -> OnnxLayerReport:
    """Swap the quantized layers and attention quantizers of `model` in place for their export-ready form;
    `components` (top-level module names) limits the swap to those parts."""
    report = OnnxLayerReport()
    for name, layer in quantized_layers(model).items():
        if not _in(name, components):
            continue
        check_deployable(name, layer)
        replacement, kernel, fallback = _export_layer(layer, config)
        model.set_submodule(name, replacement)
        report.kernels[name] = kernel
        if fallback is not None:
            report.fallbacks[name] = fallback
    for name, module in model.named_modules():
        if isinstance(module, QuantAttentionMixin) and _in(name, components):
            for role in ("q", "k", "v", "attn"):
                quantizer = getattr(module, f"{role}_quantizer")
                setattr(module, f"{role}_quantizer", ActivationQDQ.from_quantizer(quantizer))
    return report
