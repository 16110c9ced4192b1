"""The video path's two networks as ONNX graphs: memory attention (with its rotary encoding) and the memory
encoder. What blocks a full ONNX tracker is the tracking loop, not the networks (docs/deployment.md).

- `memory_attention.onnx`: curr [HW, 1, 256] and curr_pos (the current frame's top-level features and their
  position encoding, HW = (S / 16)^2), memory [M, 1, 64] and memory_pos (the spatial memories of the chosen
  frames, M = frames x HW, temporal encodings already added), obj_ptrs [P, 1, 64] and obj_ptrs_pos (the object
  pointer tokens) -> pix_feat_with_mem [HW, 1, 256]. M and P are dynamic.
- `memory_encoder.onnx`: pix_feat [1, 256, S/16, S/16] and mask [1, 1, S, S] (the mask after sam2's sigmoid,
  scale and bias, or binarised) -> maskmem_features [1, 64, S/16, S/16], maskmem_pos_enc [1, 64, S/16, S/16].

sam2's rotary encoding multiplies complex numbers (`torch.polar`, `view_as_complex`), which ONNX has no type
for, and writes the rotated keys back into a slice of k in place; `RealRotaryAttention.forward` computes the
same rotation on (real, imaginary) pairs with the precomputed cos / sin tables, and keeps the object-pointer
tokens (the last P keys) unrotated by concatenation.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F
from sam2.modeling.sam.transformer import RoPEAttention
from torch import nn

from mqsam2.deploy.onnx.export import export_module
from mqsam2.deploy.onnx.layers import OnnxExportConfig, OnnxLayerReport
from mqsam2.quant.modules import QuantAttentionMixin, _ExplicitAttention

MEMORY_ATTENTION_FILE, MEMORY_ENCODER_FILE = "memory_attention.onnx", "memory_encoder.onnx"
VIDEO_COMPONENTS = ("memory_attention", "memory_encoder")
MAX_MEMORY_FRAMES, MAX_POINTER_TOKENS = 16, 64


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """sam2's `x * freqs_cis` on consecutive (real, imaginary) pairs of the last dimension."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def _real_rotary_forward(self: RoPEAttention, q, k, v, num_k_exclude_rope: int = 0) -> torch.Tensor:
    """`RoPEAttention.forward` without complex numbers or in-place writes (same arithmetic)."""
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    cos, sin = self.rope_cos, self.rope_sin  # [HW, D / 2]
    q = _rotate(q, cos, sin)
    rotated = k.shape[-2] - num_k_exclude_rope
    repeats = rotated // cos.shape[0] if self.rope_k_repeat else 1
    k_cos = cos[None].expand(repeats, -1, -1).reshape(-1, cos.shape[-1])
    k_sin = sin[None].expand(repeats, -1, -1).reshape(-1, sin.shape[-1])
    k = torch.cat([_rotate(k[:, :, :rotated], k_cos, k_sin), k[:, :, rotated:]], dim=-2)
    if isinstance(self, QuantAttentionMixin):
        with _ExplicitAttention(self):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return self.out_proj(self._recombine_heads(out))


def use_real_rotary(model: nn.Module, feat_size: int) -> int:
    """Give every RoPEAttention of `model` the real-valued forward and its cos / sin tables for a
    feat_size x feat_size map; returns how many there were."""
    count = 0
    for module in model.modules():
        if isinstance(module, RoPEAttention):
            cis = module.compute_cis(end_x=feat_size, end_y=feat_size)
            module.register_buffer("rope_cos", cis.real.float().contiguous(), persistent=False)
            module.register_buffer("rope_sin", cis.imag.float().contiguous(), persistent=False)
            module.forward = types.MethodType(_real_rotary_forward, module)
            count += 1
    return count


class MemoryAttentionGraph(nn.Module):
    """sam2's memory attention for one frame, memories and object pointers passed apart (both dynamic)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, curr, curr_pos, memory, memory_pos, obj_ptrs, obj_ptrs_pos) -> torch.Tensor:
        return self.model.memory_attention(
            curr=curr,
            curr_pos=curr_pos,
            memory=torch.cat([memory, obj_ptrs], dim=0),
            memory_pos=torch.cat([memory_pos, obj_ptrs_pos], dim=0),
            num_obj_ptr_tokens=obj_ptrs.shape[0],
        )


class MemoryEncoderGraph(nn.Module):
    """sam2's memory encoder on an already squashed mask (`skip_mask_sigmoid=True`, as sam2 calls it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pix_feat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.memory_encoder(pix_feat, mask, skip_mask_sigmoid=True)
        return out["vision_features"], out["vision_pos_enc"][0]


def video_example_inputs(model: nn.Module, frames: int = 2, pointers: int = 8) -> dict[str, torch.Tensor]:
    """Inputs of the right shapes for both graphs (for tracing, and for tests)."""
    size = int(model.image_size)
    hw = (size // 16) ** 2
    mem_dim = model.memory_attention.layers[0].cross_attn_image.kv_in_dim
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "curr": randn(hw, 1, model.hidden_dim),
        "curr_pos": randn(hw, 1, model.hidden_dim),
        "memory": randn(frames * hw, 1, mem_dim),
        "memory_pos": randn(frames * hw, 1, mem_dim),
        "obj_ptrs": randn(pointers, 1, mem_dim),
        "obj_ptrs_pos": randn(pointers, 1, mem_dim),
        "pix_feat": randn(1, model.hidden_dim, size // 16, size // 16),
        "mask": torch.rand(1, 1, size, size, generator=generator),
    }


def export_video_networks(
    model: nn.Module, directory: str | Path, config: OnnxExportConfig | None = None
) -> tuple[dict[str, Path], OnnxLayerReport]:
    """Write `memory_attention.onnx` and `memory_encoder.onnx` for a quantized (or float) SAM2 video model."""
    from mqsam2.deploy.onnx.export import export_ready

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ready, report = export_ready(model, config or OnnxExportConfig(), VIDEO_COMPONENTS)
    use_real_rotary(ready, int(ready.image_size) // 16)
    inputs = video_example_inputs(ready)
    hw = inputs["curr"].shape[0]
    frames = torch.export.Dim("memory_frames", min=1, max=MAX_MEMORY_FRAMES)
    pointers = torch.export.Dim("pointer_tokens", min=2, max=MAX_POINTER_TOKENS)
    names = ("curr", "curr_pos", "memory", "memory_pos", "obj_ptrs", "obj_ptrs_pos")
    paths = {
        "memory_attention": directory / MEMORY_ATTENTION_FILE,
        "memory_encoder": directory / MEMORY_ENCODER_FILE,
    }
    export_module(
        MemoryAttentionGraph(ready),
        tuple(inputs[name] for name in names),
        paths["memory_attention"],
        names,
        ["pix_feat_with_mem"],
        dynamic_shapes=(None, None, {0: hw * frames}, {0: hw * frames}, {0: pointers}, {0: pointers}),
    )
    export_module(
        MemoryEncoderGraph(ready),
        (inputs["pix_feat"], inputs["mask"]),
        paths["memory_encoder"],
        ["pix_feat", "mask"],
        ["maskmem_features", "maskmem_pos_enc"],
    )
    return paths, report
