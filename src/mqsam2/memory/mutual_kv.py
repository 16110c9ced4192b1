"""Adaptive Mutual-KV (Q-MiniSAM2 §3.3): similar memory frames share one key/value in memory attention.

SAM2 feeds memory attention its conditioning frames, its recent frames (each a map of H*W tokens) and the object
pointers. Mutual-KV groups the recent frames: the newest frame not yet grouped seeds a group, every ungrouped
frame whose memory map has cosine similarity above `threshold` to the seed joins it (Eq. 6), and the group is
fed as one map, the mean of its members' maps and positional encodings (Eq. 7). Keys and values are affine in
those inputs and RoPE rotates by spatial position only, so this is exactly feeding the mean key and value.
With `log_size_bias`, log|G| is added to the group's attention logits: a group of identical members then
attends exactly as the members did (|G| equal terms in the softmax), and a group of near-identical ones nearly.
Conditioning (prompted) frames and object pointers are never grouped.

The paper lowers its threshold during training; post-training there is none, so the threshold is fixed.
Cross-attention then costs (conditioning + groups) maps instead of (conditioning + recent) maps per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import select_closest_cond_frames
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mqsam2.errors import MQSAM2Error
from mqsam2.memory.predictor import VideoPredictor
from mqsam2.quant.modules import QuantAttentionMixin


@dataclass(frozen=True)
class MutualKVOptions:
    """Similarity threshold of a group (cosine, in [-1, 1]; above 1 nothing groups) and the log|G| term."""

    threshold: float = 0.95
    log_size_bias: bool = True


def group_frames(features: Tensor, threshold: float) -> list[list[int]]:
    """Groups of frame indices (features [F, ...], oldest first): the newest ungrouped frame seeds a group and
    takes every ungrouped frame whose cosine similarity to it exceeds `threshold`. Groups are listed by their
    oldest member, members in time order."""
    flat = features.flatten(1).float()
    similarity = F.cosine_similarity(flat[:, None], flat[None], dim=-1)
    left = list(range(len(features)))
    groups = []
    while left:
        seed = left[-1]
        members = [i for i in left if i == seed or similarity[seed, i] > threshold]
        groups.append(members)
        left = [i for i in left if i not in members]
    return sorted(groups)


def share_kv(
    memory: Tensor, memory_pos: Tensor, frame_tokens: int, fixed: int, num_pointers: int, threshold: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """SAM2's memory tokens [N, B, C] = `fixed` kept maps, grouped maps, then `num_pointers` pointer tokens,
    with the grouped maps replaced by their group means; returns (memory, memory_pos, log|G| per key token,
    or None when every group is a single map)."""
    spatial = memory.shape[0] - num_pointers
    if spatial % frame_tokens:
        raise MQSAM2Error(
            f"memory attention got {spatial} map tokens, not a multiple of the {frame_tokens} tokens of one map"
        )
    maps = memory[:spatial].unflatten(0, (spatial // frame_tokens, frame_tokens))
    maps_pos = memory_pos[:spatial].unflatten(0, maps.shape[:2])
    groups = [[i] for i in range(fixed)]
    groups += [[fixed + i for i in g] for g in group_frames(maps[fixed:], threshold)]

    def mean(x: Tensor, members: list[int]) -> Tensor:
        return x[members].float().mean(dim=0).to(x.dtype)

    shared = torch.stack([mean(maps, g) for g in groups]).flatten(0, 1)
    shared_pos = torch.stack([mean(maps_pos, g) for g in groups]).flatten(0, 1)
    bias = None
    if len(groups) < len(maps):
        sizes = torch.tensor([len(g) for g in groups], dtype=torch.float32, device=memory.device)
        bias = torch.cat([sizes.log().repeat_interleave(frame_tokens), sizes.new_zeros(num_pointers)])
    return (
        torch.cat([shared, memory[spatial:]]),
        torch.cat([shared_pos, memory_pos[spatial:]]),
        bias,
    )


class _LogitBias(TorchFunctionMode):
    """Adds a per-key bias to scaled_dot_product_attention while one of the given modules runs."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.bias: Tensor | None = None
        self.active = 0
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, *_):
        self.active += 1

    def _leave(self, *_):
        self.active -= 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not self.active or self.bias is None:
            return func(*args, **kwargs)
        q, k = args[0], args[1]
        if k.shape[-2] != len(self.bias) or kwargs.get("attn_mask") is not None:
            raise MQSAM2Error(
                f"Mutual-KV: cross-attention got {k.shape[-2]} keys, the grouped memory has {len(self.bias)}"
            )
        return func(*args, **{**kwargs, "attn_mask": self.bias.to(q.dtype).view(1, 1, 1, -1)})


@contextmanager
def shared_memory_kv(
    memory_attention: nn.Module, frame_tokens: int, fixed: int, options: MutualKVOptions
) -> Iterator[None]:
    """Memory attention calls inside the block see Mutual-KV's grouped memory (and the log|G| term)."""
    cross = [layer.cross_attn_image for layer in memory_attention.layers]
    if options.log_size_bias and any(isinstance(m, QuantAttentionMixin) for m in cross):
        raise MQSAM2Error(
            "Mutual-KV's log|G| term needs float attention matmuls in memory attention: turn "
            "quant.quantize_attention off or use log_size_bias=False"
        )
    biasing = _LogitBias(cross)

    def group(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["memory"], kwargs["memory_pos"], bias = share_kv(
            kwargs["memory"],
            kwargs["memory_pos"],
            frame_tokens,
            fixed,
            kwargs.get("num_obj_ptr_tokens", 0),
            options.threshold,
        )
        biasing.bias = bias if options.log_size_bias else None
        return args, kwargs

    handle = memory_attention.register_forward_pre_hook(group, with_kwargs=True)
    try:
        with biasing:
            yield
    finally:
        handle.remove()
        biasing.remove()


class MutualKVVideoPredictor(VideoPredictor):
    """SAM2's video predictor (stock FIFO memory selection) with Adaptive Mutual-KV in memory attention.

    Built through hydra's `_target_` (`build_sam2(..., memory_policy="mutual-kv")`) or switched in place with
    `set_memory_policy(model, "mutual-kv", threshold=...)`.
    """

    def __init__(self, threshold: float = 0.95, log_size_bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.configure_memory(threshold=threshold, log_size_bias=log_size_bias)

    def configure_memory(self, **options) -> None:
        self.memory_options = MutualKVOptions(**options)

    def _prepare_memory_conditioned_features(
        self,
        frame_idx,
        is_init_cond_frame,
        current_vision_feats,
        current_vision_pos_embeds,
        feat_sizes,
        output_dict,
        num_frames,
        track_in_reverse=False,
    ):
        args = (current_vision_feats, current_vision_pos_embeds, feat_sizes, output_dict, num_frames)
        if is_init_cond_frame or self.num_maskmem == 0:
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, *args, track_in_reverse
            )
        selected, _ = select_closest_cond_frames(
            frame_idx, output_dict["cond_frame_outputs"], self.max_cond_frames_in_attn
        )
        height, width = feat_sizes[-1]
        with shared_memory_kv(self.memory_attention, height * width, len(selected), self.memory_options):
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, *args, track_in_reverse
            )
