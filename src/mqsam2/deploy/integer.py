"""Calibrated-activation integer Linear layers: the fake-quant W{b}A{b} layer computed exactly in integer
arithmetic, written in plain PyTorch ops so that `torch.compile` keeps them inside the compiled graph (no
tensor subclass, no Python dispatch per call) and fuses the activation quantization into one elementwise
kernel in front of the GEMM.

A quantized layer computes `y = sum_k (a_k - z_a) s_a (q_nk - z_n) S_n + bias` with a_k the activation codes
(`clamp(round(x / s_a) + z_a, 0, 2^a - 1)`, the calibrated per-tensor step) and q the weight codes. Both
integer factors are exact in two GEMMs:

- `fp8`: when weights and activations have at most 4 bits, `a - z_a` and `q - z` are integers in -15..15,
  which float8 e4m3 holds exactly; `torch._scaled_mm` multiplies them with row-wise scales s_a and S_n and
  accumulates in fp32 (the sums stay far below 2^24, so they are exact too).
- `int8`: otherwise `torch._int_mm` (int8 x int8 -> int32). A side of at most 7 bits enters as `code - z`
  (in -127..127); an 8-bit side enters as `code - 128` and the zero-point's share is added back from the
  other side's row or column sums, which is exact integer algebra:
  `sum (a - z_a)(q - z) = sum A B - (z_a - c_a) sum_k B - (z - c_q) sum_k A + K (z_a - c_a)(z - c_q)` with
  `A = a - c_a`, `B = q - c_q`.

The float work left is the scaling of an exact integer sum: the layer equals the fake-quant layer up to fp32
rounding of its output (bf16 under autocast, as every SAM2 layer on the GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.export.pack import pack_codes
from mqsam2.quant.affine import qmax
from mqsam2.quant.modules import QuantLayerMixin

FP8_MAX_BITS = 4  # |code - zero_point| <= 15: exact in float8 e4m3 (integers up to 16)
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows; fewer are zero-padded
FP8_DIM_MULTIPLE = 16  # torch._scaled_mm: K and N multiples of 16
INT8_DIM_MULTIPLE = 8  # torch._int_mm: K and N multiples of 8


def integer_kernel(layer: QuantLayerMixin) -> tuple[str | None, str | None]:
    """(kernel, None) for a Linear the integer layer can take (`fp8` or `int8`), else (None, why not)."""
    if not isinstance(layer, nn.Linear):
        return None, "not a Linear"
    if layer.input_quantizer is None:
        return None, "weight-only layer: no calibrated activation step"
    k, n = layer.in_features, layer.out_features
    if (
        max(layer.bits, layer.act_bits) <= FP8_MAX_BITS
        and k % FP8_DIM_MULTIPLE == 0
        and n % FP8_DIM_MULTIPLE == 0
    ):
        return "fp8", None
    if k % INT8_DIM_MULTIPLE == 0 and n % INT8_DIM_MULTIPLE == 0:
        return "int8", None
    return None, f"in/out features {k}/{n} are not multiples of {INT8_DIM_MULTIPLE} (torch._int_mm)"


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """What a float Linear would return: the autocast dtype inside autocast, else the input's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _centre(bits: int, zero_point: torch.Tensor) -> torch.Tensor:
    """The integer subtracted from a side's codes before the int8 GEMM: its zero-point up to 7 bits, 128 at 8."""
    return zero_point if bits <= 7 else torch.full_like(zero_point, 128.0)


class IntegerLinear(nn.Module):
    """A calibrated W{b}A{b} Linear on `torch._scaled_mm` (fp8) or `torch._int_mm` (int8); see the module doc.

    The weight codes are held bit-packed at the layer's own width (b / 8 bytes per parameter, the export's bit
    order: eight codes in b bytes) and unpacked on each call, in the compiled graph one elementwise kernel in
    front of the GEMM.
    """

    def __init__(self, layer: QuantLayerMixin, kernel: str):
        super().__init__()
        quantizer, act = layer.weight_quantizer, layer.input_quantizer
        if quantizer.alpha is not None:
            raise MQSAM2Error(
                f"{quantizer.name}: finish its reconstruction unit (hardening) before deploying"
            )
        self.kernel, self.bits = kernel, layer.bits
        self.in_features, self.out_features = layer.in_features, layer.out_features
        act_scale = act.scale.detach().float()
        self.act_inverse = float(1.0 / act_scale)  # the float32 reciprocal fake_quantize multiplies by
        self.act_scale, self.act_zero, self.act_max = float(act_scale), float(act.zero_point), qmax(act.bits)
        codes = quantizer.codes(layer.weight.detach())
        zero = quantizer.zero_point.detach().float()
        scale = quantizer.scale.detach().float()
        self.register_buffer(
            "packed", pack_codes(codes, self.bits).reshape(self.out_features, -1).to(codes.device)
        )
        self.register_buffer(
            "byte_shifts", 8 * torch.arange(self.bits, device=codes.device), persistent=False
        )
        self.register_buffer(
            "code_shifts", self.bits * torch.arange(8, device=codes.device), persistent=False
        )
        self.register_buffer("weight_scale", scale.clone())
        self.register_buffer("output_scale", scale * act_scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        # the integers subtracted from the codes before the GEMM: the zero-points (fp8; int8 up to 7 bits),
        # or 128 for an 8-bit side of the int8 GEMM, whose zero-point share is added back from sums
        self.act_centre = (
            self.act_zero if kernel == "fp8" else float(_centre(act.bits, torch.tensor(self.act_zero)))
        )
        centre = zero if kernel == "fp8" else _centre(self.bits, zero)
        self.register_buffer("weight_centre", centre.clone())
        act_offset = self.act_zero - self.act_centre
        weight_offset = zero - centre
        column_sums = (codes.float() - centre[:, None]).sum(1)
        self.register_buffer(
            "column_term", act_offset * column_sums - self.in_features * act_offset * weight_offset
        )
        self.register_buffer("weight_offset", weight_offset)
        self.corrected = bool(act_offset != 0 or weight_offset.any())

    def weight_codes(self) -> torch.Tensor:
        """The codes [N, K] unpacked (eight b-bit codes are one little-endian integer of b bytes)."""
        groups = self.packed.reshape(self.out_features, -1, self.bits).long()
        words = (groups << self.byte_shifts).sum(-1, keepdim=True)
        return ((words >> self.code_shifts) & ((1 << self.bits) - 1)).reshape(self.out_features, -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """Activation codes minus the centre, as mqsam2's fake-quant rounds them (x * (1 / s), half to even)."""
        codes = torch.clamp(torch.round(x.float() * self.act_inverse) + self.act_zero, 0, self.act_max)
        return codes - self.act_centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = output_dtype(x)
        # cuBLAS takes the activations row-major only (fp8 on sm90: the TN layout); a permuted input of one
        # image (Hiera's NCHW -> NHWC at batch 1) reshapes to a column-major view, so make the rows contiguous
        rows = x.reshape(-1, self.in_features).contiguous()
        a = self._codes(rows)
        weight = self.weight_codes().float() - self.weight_centre[:, None]
        if self.kernel == "fp8":
            y = torch._scaled_mm(
                a.to(torch.float8_e4m3fn),
                weight.to(torch.float8_e4m3fn).t(),
                scale_a=torch.full((a.shape[0], 1), self.act_scale, device=x.device),
                scale_b=self.weight_scale[None],
                out_dtype=torch.bfloat16,
            ).float()
        else:
            count = a.shape[0]
            a = a.to(torch.int8)
            if count < INT_MM_MIN_ROWS:
                a = F.pad(a, (0, 0, 0, INT_MM_MIN_ROWS - count))
            acc = torch._int_mm(a, weight.to(torch.int8).t())[
                :count
            ].float()  # B column-major, as cuBLAS wants
            if self.corrected:
                row_sums = a[:count].float().sum(1, keepdim=True)
                acc = acc - self.column_term[None] - row_sums * self.weight_offset[None]
            y = acc * self.output_scale[None]
        if self.bias is not None:
            y = y + self.bias
        return y.to(out_dtype).reshape(*x.shape[:-1], self.out_features)
