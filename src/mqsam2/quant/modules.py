"""Quantized drop-in layers: Linear and Conv2d with an input quantizer and a per-channel weight quantizer,
and attention whose QK^T and softmax·V matmuls run explicitly on quantized operands.

The layers subclass the float ones and keep their parameters (same names, same tensors), so SAM2's code keeps
working and `name.weight` still addresses the weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mqsam2.quant.log2 import Log2Quantizer
from mqsam2.quant.quantizer import ActQuantizer, WeightQuantizer


class QuantLayerMixin:
    """What QuantLinear and QuantConv2d share: the two quantizers and how they are wired."""

    input_quantizer: ActQuantizer | None
    weight_quantizer: WeightQuantizer

    def _init_quantizers(self, bits: int, act_bits: int | None) -> None:
        device = self.weight.device
        self.weight_quantizer = WeightQuantizer(bits, self.weight.shape[0]).to(device)
        self.input_quantizer = ActQuantizer(act_bits).to(device) if act_bits is not None else None

    @property
    def bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.input_quantizer is None else self.input_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight; without gradients it is computed once and reused until the weight or
        its quantizer changes (evaluation would otherwise re-quantize every weight at every call)."""
        quantizer = self.weight_quantizer
        weight = self.weight
        if torch.is_grad_enabled() or quantizer.alpha is not None or not quantizer.enabled:
            return quantizer(weight)
        if any(t.is_inference() for t in (weight, quantizer.scale, quantizer.zero_point)):
            return quantizer(weight)  # made under inference_mode: no version counter to key a cache on
        key = (
            weight.data_ptr(),
            weight._version,
            quantizer.scale._version,
            quantizer.zero_point._version,
            quantizer.bits,
        )
        if getattr(self, "_frozen_key", None) != key:
            self._frozen_weight = quantizer(weight)
            self._frozen_key = key
        return self._frozen_weight

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @torch.no_grad()
    def harden_rounding(self) -> None:
        self.weight.copy_(self.weight_quantizer.harden(self.weight))

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int, act_bits: int | None) -> QuantLayerMixin:
        """Wrap a float layer in place of itself, sharing its parameter tensors."""
        quant = cls.__new__(cls)
        quant.__dict__.update(layer.__dict__)
        quant._parameters = dict(layer._parameters)
        quant._buffers = dict(layer._buffers)
        quant._modules = dict(layer._modules)
        quant._init_quantizers(bits, act_bits)
        return quant

    def to_float(self, weight: torch.Tensor | None = None) -> nn.Module:
        """The plain float layer under this one (the reverse of `from_float`), holding `weight` if given."""
        float_class = next(base for base in FLOAT_TO_QUANT if isinstance(self, base))
        plain = float_class.__new__(float_class)
        plain.__dict__.update(self.__dict__)
        plain._parameters = dict(self._parameters)
        plain._buffers = dict(self._buffers)
        plain._modules = {
            k: m for k, m in self._modules.items() if k not in ("weight_quantizer", "input_quantizer")
        }
        if weight is not None:
            plain.weight = nn.Parameter(weight.to(self.weight.dtype), requires_grad=False)
        return plain


class QuantLinear(QuantLayerMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


FLOAT_TO_QUANT: dict[type[nn.Module], type[QuantLayerMixin]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
}


class _ExplicitAttention(TorchFunctionMode):
    """Inside one attention module, replaces scaled_dot_product_attention by explicit matmuls whose operands
    pass through that module's quantizers (q, k, v and the softmax probabilities)."""

    def __init__(self, owner: QuantAttentionMixin):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise NotImplementedError("quantized attention supports unmasked attention only (as in SAM2)")
        if kwargs.get("dropout_p", 0.0) > 0:
            raise NotImplementedError("quantized attention runs in eval mode only")
        owner = self.owner
        scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        logits = (owner.q_quantizer(q) @ owner.k_quantizer(k).transpose(-2, -1)) * scale
        probs = owner.quantized_probabilities(torch.softmax(logits.float(), dim=-1).to(v.dtype), v)
        return probs @ owner.v_quantizer(v)


PROBABILITY_QUANTIZERS: dict[str, type[ActQuantizer] | type[Log2Quantizer]] = {
    "uniform": ActQuantizer,
    "log2": Log2Quantizer,
}


class QuantAttentionMixin(nn.Module):
    """Mixed into a copy of SAM2's attention classes; the original forward runs under `_ExplicitAttention`."""

    q_quantizer: ActQuantizer
    k_quantizer: ActQuantizer
    v_quantizer: ActQuantizer
    attn_quantizer: ActQuantizer | Log2Quantizer

    def init_attention_quantizers(self, bits: int, probabilities: str = "uniform") -> None:
        """Uniform quantizers for q, k and v; the softmax probabilities' kind is `uniform` or `log2`."""
        device = next(self.parameters()).device
        for role in ("q", "k", "v"):
            setattr(self, f"{role}_quantizer", ActQuantizer(bits).to(device))
        self.attn_quantizer = PROBABILITY_QUANTIZERS[probabilities](bits).to(device)

    def quantized_probabilities(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The softmax probabilities through `attn_quantizer`; a log2 one also sees the values they multiply,
        since it calibrates on the error of `P @ V` (PTQ4SAM's AGQ)."""
        if isinstance(self.attn_quantizer, Log2Quantizer):
            return self.attn_quantizer(probs, v)
        return self.attn_quantizer(probs)

    def forward(self, *args, **kwargs):
        with _ExplicitAttention(self):
            return super().forward(*args, **kwargs)


_QUANT_ATTENTION_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def quant_attention_class(cls: type[nn.Module]) -> type[nn.Module]:
    """One quantized subclass per SAM2 attention class (created once, so isinstance holds; pickling finds it
    through the module's `__getattr__`)."""
    if cls not in _QUANT_ATTENTION_CLASSES:
        _QUANT_ATTENTION_CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantAttentionMixin, cls), {})
    return _QUANT_ATTENTION_CLASSES[cls]


def __getattr__(name: str) -> type[nn.Module]:
    """Pickle looks a quantized attention class up here by name (e.g. a saved calibrated model): make it from
    its SAM2 class, so loading works in a fresh process too."""
    from sam2.modeling.backbones.hieradet import MultiScaleAttention
    from sam2.modeling.sam.transformer import Attention, RoPEAttention

    for cls in (Attention, RoPEAttention, MultiScaleAttention):
        if name == f"Quant{cls.__name__}":
            return quant_attention_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
