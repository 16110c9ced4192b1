"""Run a quantized SAM2 on real low-bit PyTorch kernels: `deploy(model)` swaps its quantized layers in place.

The fake-quant model (`mqsam2.quant.quantize` + calibration, or `mqsam2.export.load_export`) computes every layer
in float with rounded weights; here each layer goes to the fastest kernel that reproduces its weights:

- Linear with weight bits <= 4 (2, 3 and 4): PyTorch's tinygemm int4 kernel (`aten._weight_int4pack_mm`, the
  kernel behind torchao's `tile_packed_to_4d` format), packed from the layer's own integer codes, never
  re-quantized. tinygemm computes `w = (c - 8) * scale + zero` per group of a row; ours is `w = (q - Z) * S` per
  row, so `scale = S` and `zero = (8 - Z - shift) * S` with codes `c = q + shift`. A 2- or 3-bit code range fits
  inside 0..15 with room to spare, so `shift = 8 - Z` there and the zero term vanishes; 4-bit codes need
  `shift = 0`. Scale and zero are bf16, as the kernel requires.
- Linear with 5..8 bits: torchao's `Int8DynamicActivationInt8WeightConfig` (version 2, `Int8Tensor`) on a Linear
  holding the exactly dequantized weight. torchao re-quantizes it symmetric per output channel; handed fp32, its
  codes are the nearest, at most half an int8 step from our (already <= 8-bit) grid (handed bf16, it divides in
  bf16 and lands up to 1.3 steps away). Its matmul runs on int8 tensor cores with bf16 output.
- Activations: Hopper has no sub-8-bit activation kernel. int4 layers are weight-only and keep bf16 activations;
  int8 layers quantize activations per token at run time (torchao's dynamic scheme), not with the calibrated
  per-tensor step. The calibrated input quantizers are therefore not applied anywhere.
- Quantized Conv2d layers, and Linear layers whose shape a kernel cannot take (tinygemm needs in_features to be a
  multiple of 32 and an Ampere-or-newer GPU; those go to the int8 path), become float layers holding the
  dequantized weight (bf16 compute under autocast); quantized attention returns to SAM2's SDPA.

The report (`model.mqsam2_deploy_report`) counts layers per kernel and says why any fell back. Pack on the device
the model will run on (CPU and CUDA int4 layouts differ): move the model first, then deploy.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from mqsam2.deploy.integer import IntegerLinear, integer_kernel, output_dtype
from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import dequantize_affine
from mqsam2.quant.modules import QuantAttentionMixin, QuantLayerMixin
from mqsam2.quant.swap import ATTENTION_CLASSES, quantized_layers

# tinygemm's group sizes; our scale is per row, so any that divides in_features gives the same weight
INT4_GROUP_SIZES = (256, 128, 64, 32)
INT4_INNER_K_TILES = (8, 4, 2)
INT4_ROW_MULTIPLE = 16  # the CPU packing needs N % 16 == 0 (CUDA: 8); rows are zero-padded up to it
INT4_MIN_K_MULTIPLE = 32  # K must split into 2 k-tiles of 16 (CUDA packing) and into groups of >= 32


@dataclass(frozen=True)
class DeployConfig:
    """Which kernel a layer's weight bit-width selects.

    `int4_max_bits`: Linear layers at or below this width run on the int4 kernel (0 sends every layer to the
    int8 path, e.g. to compare the two at large token counts). `set_inductor_config`: apply torchao's
    recommended global Inductor settings (coordinate-descent tuning, int_mm fusion); off by default because
    they also change every other model compiled in the process. `activations="calibrated"` runs every Linear
    that has a calibrated input quantizer on `mqsam2.deploy.integer.IntegerLinear` (fp8 GEMM up to 4 bits,
    int8 GEMM above, both exact in the codes of weights and activations, as the fake-quant model computes);
    the default "dynamic" keeps the weight-only int4 / dynamic int8 kernels below.
    """

    int4_max_bits: int = 4
    set_inductor_config: bool = False
    activations: str = "dynamic"

    def __post_init__(self) -> None:
        if self.activations not in ("dynamic", "calibrated"):
            raise MQSAM2Error(f"activations={self.activations!r}: use 'dynamic' or 'calibrated'")
        if not 0 <= self.int4_max_bits <= 4:
            raise MQSAM2Error(
                f"int4_max_bits={self.int4_max_bits}: use 0..4 (the int4 kernel holds 4-bit codes)"
            )


@dataclass
class DeployReport:
    """Where each quantized layer went: `kernels[name]` is int4, int8, fp8-static, int8-static or float;
    `fallbacks[name]` says why a layer did not get the kernel its bit-width selects."""

    kernels: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    attention_modules: int = 0
    calibrated_activations: int = 0

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.kernels.values()))

    def summary(self) -> str:
        counts = ", ".join(f"{kernel} {n}" for kernel, n in sorted(self.counts().items()))
        lines = [f"deployed {len(self.kernels)} layers: {counts}"]
        reasons = Counter((self.kernels[name], reason) for name, reason in self.fallbacks.items())
        lines += [f"  {n} to {kernel}: {reason}" for (kernel, reason), n in reasons.most_common()]
        if self.attention_modules:
            lines.append(f"  {self.attention_modules} quantized attention modules back to float SDPA")
        if self.calibrated_activations:
            lines.append(
                f"  {self.calibrated_activations} calibrated input quantizers not applied (int4: bf16 "
                "activations; int8: per-token dynamic int8)"
            )
        return "\n".join(lines)


def int4_unsupported_reason(in_features: int, device: torch.device) -> str | None:
    """Why the tinygemm int4 kernel cannot run a Linear with this many input features here (None: it can)."""
    if in_features % INT4_MIN_K_MULTIPLE:
        return f"int4: in_features {in_features} is not a multiple of {INT4_MIN_K_MULTIPLE}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "int4: tinygemm needs compute capability >= 8.0"
    if device.type not in ("cpu", "cuda"):
        return f"int4: no tinygemm kernel on {device.type}"
    return None


@dataclass(frozen=True)
class Int4Pack:
    """A weight in tinygemm's layout: packed codes, bf16 [K / group, N_padded, 2] (scale, zero), group size."""

    packed: torch.Tensor
    scale_and_zeros: torch.Tensor
    group_size: int


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> Int4Pack:
    """The exact weight `(codes - zero_point) * scale` (per row, codes [N, K] in 0..2^bits-1) in tinygemm's
    layout for the device the codes are on; rows are zero-padded to a multiple of 16 (padded outputs are 0)."""
    rows, in_features = codes.shape
    reason = int4_unsupported_reason(in_features, codes.device)
    if reason is not None or bits > 4:
        raise MQSAM2Error(reason or f"int4: {bits}-bit codes do not fit in 4 bits")
    zero_point = zero_point.float()
    shift = torch.clamp(8 - zero_point, 0, 16 - 2**bits)
    tiles = codes.to(torch.int32) + shift.to(torch.int32)[:, None]
    zero = (8 - zero_point - shift) * scale.float()
    pad = -rows % INT4_ROW_MULTIPLE
    tiles = F.pad(tiles, (0, 0, 0, pad))
    params = F.pad(torch.stack([scale.float(), zero], dim=-1), (0, 0, 0, pad))
    group_size = next(g for g in INT4_GROUP_SIZES if in_features % g == 0)
    inner_k_tiles = next(t for t in INT4_INNER_K_TILES if in_features % (16 * t) == 0)
    scale_and_zeros = params[None].expand(in_features // group_size, -1, -1).to(torch.bfloat16).contiguous()
    if codes.device.type == "cuda":
        # two codes per byte, the even column in the high nibble (the layout the CUDA packing kernel reads)
        nibbles = (tiles[:, ::2] << 4 | tiles[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner_k_tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(tiles.contiguous(), inner_k_tiles)
    return Int4Pack(packed, scale_and_zeros, group_size)


class Int4WeightOnlyLinear(nn.Module):
    """A Linear whose weight lives as 4-bit codes in tinygemm's layout; activations stay bf16 (weight-only)."""

    def __init__(self, pack: Int4Pack, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, pack.group_size
        self.layout = pack.packed.device.type
        self.register_buffer("packed", pack.packed)
        self.register_buffer("scale_and_zeros", pack.scale_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_quantized(cls, layer: QuantLayerMixin) -> Int4WeightOnlyLinear:
        quantizer = layer.weight_quantizer
        codes = quantizer.codes(layer.weight.detach())
        pack = pack_int4(codes, quantizer.scale.detach(), quantizer.zero_point.detach(), quantizer.bits)
        return cls(pack, layer.in_features, layer.out_features, layer.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.layout:
            raise MQSAM2Error(
                f"int4 weights were packed for {self.layout} but the input is on {x.device.type}: move the "
                "model to its device before mqsam2.deploy.deploy"
            )
        out_dtype = output_dtype(x)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if rows.shape[0] == 0:
            y = rows.new_zeros(0, self.out_features)
        elif self.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size, self.scale_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.group_size, self.scale_and_zeros
            )
        y = y[:, : self.out_features].to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _torchao_int8(layer: nn.Linear, config: DeployConfig) -> None:
    """torchao's int8 dynamic-activation, int8-weight quantization of `layer`, in place."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise MQSAM2Error(
            "the int8 kernels come from torchao, which is not installed: pip install torchao (>= 0.17)"
        ) from None
    with warnings.catch_warnings():  # the config fills in a version-1 layout that version 2 never uses
        warnings.filterwarnings("ignore", message="Deprecation: PlainLayout")
        torchao_config = Int8DynamicActivationInt8WeightConfig(
            version=2, set_inductor_config=config.set_inductor_config
        )
    quantize_(layer, torchao_config)


class Int8DynamicLinear(nn.Linear):
    """torchao's int8 weight + dynamic per-token int8 activation Linear, fed bf16 whatever the caller's dtype."""

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, config: DeployConfig
    ) -> Int8DynamicLinear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        _torchao_int8(layer, config)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(output_dtype(x))


def _dequantized_weight(layer: QuantLayerMixin) -> torch.Tensor:
    quantizer = layer.weight_quantizer
    codes = quantizer.codes(layer.weight.detach())
    return dequantize_affine(codes, quantizer.scale.detach(), quantizer.zero_point.detach(), axis=0)


def check_deployable(name: str, layer: QuantLayerMixin) -> None:
    if layer.weight_quantizer.alpha is not None:
        raise MQSAM2Error(
            f"layer {name} still holds soft AdaRound rounding: finish its reconstruction unit (hardening) "
            "before deploying"
        )


def _deploy_layer(
    name: str, layer: QuantLayerMixin, config: DeployConfig
) -> tuple[nn.Module, str, str | None]:
    """(replacement, kernel, why it fell back or None)."""
    check_deployable(name, layer)
    if not isinstance(layer, nn.Linear):
        return (
            layer.to_float(_dequantized_weight(layer)),
            "float",
            "Conv2d: no low-bit convolution kernel",
        )
    fallback = None
    if config.activations == "calibrated":
        kernel, fallback = integer_kernel(layer)
        if kernel is not None:
            return IntegerLinear(layer, kernel), f"{kernel}-static", None
    if layer.bits <= config.int4_max_bits:
        int4_reason = int4_unsupported_reason(layer.in_features, layer.weight.device)
        if int4_reason is None:
            return Int4WeightOnlyLinear.from_quantized(layer), "int4", fallback
        fallback = int4_reason
    return Int8DynamicLinear.from_weight(_dequantized_weight(layer), layer.bias, config), "int8", fallback


def _restore_float_attention(model: nn.Module) -> int:
    """Quantized attention back to its SAM2 class (SDPA on bf16 q, k, v); returns how many there were."""
    restored = 0
    for module in model.modules():
        if isinstance(module, QuantAttentionMixin):
            module.__class__ = next(
                c
                for c in type(module).__mro__
                if issubclass(c, ATTENTION_CLASSES) and not issubclass(c, QuantAttentionMixin)
            )
            for role in ("q", "k", "v", "attn"):
                delattr(module, f"{role}_quantizer")
            restored += 1
    return restored


def deploy(model: nn.Module, config: DeployConfig | None = None) -> nn.Module:
    """Swap the quantized layers of `model` in place for kernel-backed ones and return it (see the module doc);
    the report is `model.mqsam2_deploy_report`."""
    config = config or DeployConfig()
    layers = quantized_layers(model)
    if not layers:
        already = any(isinstance(m, Int4WeightOnlyLinear | Int8DynamicLinear) for m in model.modules())
        raise MQSAM2Error(
            "cannot deploy: the model is already deployed"
            if already
            else "cannot deploy a float model: quantize and calibrate it first (mqsam2.quant.quantize + "
            "calibration) or load an export (mqsam2.export.load_export)"
        )
    report = DeployReport()
    for name, layer in layers.items():
        replacement, kernel, fallback = _deploy_layer(name, layer, config)
        model.set_submodule(name, replacement)
        report.kernels[name] = kernel
        if fallback is not None:
            report.fallbacks[name] = fallback
        report.calibrated_activations += layer.input_quantizer is not None and not kernel.endswith("-static")
    report.attention_modules = _restore_float_attention(model)
    model.mqsam2_deploy_report = report
    return model


def weight_nbytes(module: nn.Module) -> int:
    """Bytes of storage behind all parameters and buffers, each storage once; tensor subclasses (torchao's
    quantized weights) count by the plain tensors they hold."""
    storages: dict[tuple[torch.device, int], int] = {}
    pending = [*module.parameters(), *module.buffers()]
    while pending:
        tensor = pending.pop()
        if is_traceable_wrapper_subclass(tensor):
            inner_names, _ = tensor.__tensor_flatten__()
            pending.extend(getattr(tensor, inner) for inner in inner_names)
            continue
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
