"""The quantized computations of an exported SAM2 as PyTorch custom ops, each with two meanings: its PyTorch
implementation is the fake-quant arithmetic of `mqsam2.quant` (so the export-ready model computes exactly
what the quantized model computes), and its ONNX translation is the standard op an ONNX runtime runs on
integers:

- `fake_quantize_activation`: QuantizeLinear -> DequantizeLinear (uint8, per tensor, the calibrated step and
  zero-point); a width below 8 bits clips to its own range first, so the codes stay in 0..2^b-1;
- `dequantize_weight`: DequantizeLinear of the layer's own uint8 codes with per-channel scales and zero-points;
- `matmul_nbits`: com.microsoft MatMulNBits, 4-bit codes packed two per byte in blocks along K.

ONNX Runtime fuses QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear into its integer GEMM
(MatMulIntegerToFloat, uint8 x uint8 -> fp32).
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

from mqsam2.quant.affine import dequantize_affine, fake_quantize_to

OPSET = 21  # QuantizeLinear / DequantizeLinear with per-axis parameters and saturation


def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """ONNX Runtime's contrib op MatMulNBits (com.microsoft, v1), the part we emit; onnx ships no schema for
    it, and onnxscript needs one to build the node."""
    schema = onnx.defs.OpSchema
    parameter, attribute = schema.FormalParameter, schema.Attribute
    return schema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[
            parameter("A", "T1"),
            parameter("B", "T2"),
            parameter("scales", "T1"),
            parameter("zero_points", "T3", param_option=schema.FormalParameterOption.Optional),
        ],
        outputs=[parameter("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
            ("T2", ["tensor(uint8)"], "packed codes"),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero-points"),
        ],
        attributes=[
            attribute("K", schema.AttrType.INT, "input features"),
            attribute("N", schema.AttrType.INT, "output features"),
            attribute("bits", schema.AttrType.INT, "code width"),
            attribute("block_size", schema.AttrType.INT, "inputs per block"),
            attribute("accuracy_level", onnx.helper.make_attribute("accuracy_level", 0), "compute type"),
        ],
    )


if "MatMulNBits" not in Opset("com.microsoft", 1):
    onnx.defs.register_schema(_matmul_nbits_schema())
MATMUL_NBITS = Op(Opset("com.microsoft", 1), "MatMulNBits")
NBITS = 4  # MatMulNBits' code width; 2- and 3-bit codes run in it unchanged


@torch.library.custom_op("mqsam2_onnx::fake_quantize_activation", mutates_args=())
def fake_quantize_activation(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """`mqsam2.quant.fake_quantize` of an activation with a float32 step (the ActQuantizer's arithmetic)."""
    step = torch.tensor(scale, dtype=torch.float32, device=x.device)
    zero = torch.tensor(float(zero_point), device=x.device)
    return fake_quantize_to(x, step, zero, qmax)


@fake_quantize_activation.register_fake
def _(x, scale, zero_point, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("mqsam2_onnx::dequantize_weight", mutates_args=())
def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int
) -> torch.Tensor:
    """`(codes - zero_point) * scale` along `axis` in float32, the weight the fake-quant forward uses."""
    return dequantize_affine(codes, scale, zero_point, axis=axis)


@dequantize_weight.register_fake
def _(codes, scale, zero_point, axis):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def unpack_nbits(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """MatMulNBits' B [N, blocks, block_size / 2] back to codes [N, K]: code j of a block sits in byte j // 2,
    the low nibble for even j."""
    rows = packed.shape[0]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, -1)
    return codes[:, :in_features]


def unpack_nbits_zero_points(packed: torch.Tensor, blocks: int) -> torch.Tensor:
    """MatMulNBits' zero-points [N, ceil(blocks / 2)] back to [N, blocks] (block b in byte b // 2)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :blocks]


@torch.library.custom_op("mqsam2_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    in_features: int,
    out_features: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """x @ W^T with W = (code - zero_point) * scale per block of `block_size` inputs (MatMulNBits' formula)."""
    blocks = packed.shape[1]
    codes = unpack_nbits(packed, blocks * block_size).reshape(-1, blocks, block_size).float()
    zero = unpack_nbits_zero_points(zero_points, blocks).float()[..., None]
    weight = ((codes - zero) * scales.reshape(-1, blocks, 1)).reshape(packed.shape[0], -1)
    return torch.matmul(x, weight[:out_features, :in_features].t())


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, in_features, out_features, block_size, accuracy_level):
    return x.new_empty(*x.shape[:-1], out_features)


def _uint8_scalar(value: int):
    return op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [value]))


def _fake_quantize_activation_onnx(x, scale: float, zero_point: int, qmax: int):
    if qmax < 255:
        low = op.Constant(value_float=(0 - zero_point) * scale)
        high = op.Constant(value_float=(qmax - zero_point) * scale)
        x = op.Clip(x, op.CastLike(low, x), op.CastLike(high, x))
    step, zero = op.Constant(value_float=scale), _uint8_scalar(zero_point)
    return op.DequantizeLinear(op.QuantizeLinear(x, step, zero), step, zero)


def _dequantize_weight_onnx(codes, scale, zero_point, axis: int):
    return op.DequantizeLinear(codes, scale, zero_point, axis=axis)


def _matmul_nbits_onnx(
    x, packed, scales, zero_points, in_features: int, out_features: int, block_size: int, accuracy_level: int
):
    return MATMUL_NBITS(
        x,
        packed,
        scales,
        zero_points,
        K=in_features,
        N=out_features,
        bits=NBITS,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )


TRANSLATIONS = {
    torch.ops.mqsam2_onnx.fake_quantize_activation.default: _fake_quantize_activation_onnx,
    torch.ops.mqsam2_onnx.dequantize_weight.default: _dequantize_weight_onnx,
    torch.ops.mqsam2_onnx.matmul_nbits.default: _matmul_nbits_onnx,
}
