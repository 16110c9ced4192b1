"""Q-MiniSAM2's Hierarchy-based Video Quantization (HVQ): the reconstruction loss of the video units.

For a sample at frame t of a calibration clip, the float output f_fp(t) is the anchor, the quantized output
f_q(t) the positive, and the quantized outputs of an earlier frame of the same clip the negatives:

    L = alpha * triplet(f_fp(t), f_q(t), f_q(t_tem)) + beta * triplet(f_fp(t), f_q(t), f_q(t_sem)) + gamma * L_rec

with t_tem a "temporal" frame in {t - l_short, ..., t - 1} and t_sem a "semantic" frame in
{t - l_long, ..., t - l_short - 1} (the paper's intervals (t - l_short, t) and (t - l_long, t - l_short), read as
two windows that tile the last l_long frames). Defaults: alpha 1, beta 0.5, gamma 0.4 (the paper's); l_short 6
(the frames SAM2's memory bank holds, num_maskmem - 1) and l_long 16 (SAM2's object-pointer window,
max_obj_ptrs_in_encoder), so temporal frames are the ones the current frame attends to directly and semantic
frames the older ones it only sees through object pointers; the paper does not give its values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mqsam2.errors import MQSAM2Error
from mqsam2.reconstruct.cache import UnitCache
from mqsam2.reconstruct.positions import Position

VIDEO_UNITS = ("memory_attention.", "memory_encoder")


def is_video_unit(name: str) -> bool:
    """Memory attention layers and the memory encoder: the units whose inputs depend on earlier frames."""
    return name.startswith(VIDEO_UNITS)


@dataclass(frozen=True)
class HVQConfig:
    """Weights of the three terms, the two windows (frames) and the triplet margin (PyTorch's default)."""

    alpha: float = 1.0
    beta: float = 0.5
    gamma: float = 0.4
    l_short: int = 6
    l_long: int = 16
    margin: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.l_short < self.l_long:
            raise MQSAM2Error(
                f"hvq needs 1 <= l_short < l_long, got l_short={self.l_short}, l_long={self.l_long}"
            )
        if min(self.alpha, self.beta, self.gamma) < 0 or self.margin <= 0:
            raise MQSAM2Error("hvq weights (alpha, beta, gamma) must be non-negative and the margin positive")


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0) -> Tensor:
    """mean over rows of max(||a - p|| - ||a - n|| + margin, 0), rows flattened to vectors."""
    near = (anchor - positive).flatten(1).norm(dim=1)
    far = (anchor - negative).flatten(1).norm(dim=1)
    return torch.clamp(near - far + margin, min=0).mean()


class FrameTimeline:
    """Each cached sample's track (clip, object) and frame, so earlier frames of the same track can be drawn.

    SAM2 tracks objects one at a time within a frame, always in the same order, so the k-th call of a unit at
    one (clip, frame) belongs to the k-th object tracked there.
    """

    def __init__(self, positions: Sequence[Position | None]):
        self.frame: list[int | None] = []
        self.track: list[tuple[int, int] | None] = []
        self._by_track: dict[tuple[int, int], dict[int, int]] = {}
        seen: dict[Position, int] = {}
        for index, position in enumerate(positions):
            if position is None:
                self.frame.append(None)
                self.track.append(None)
                continue
            ordinal = seen.get(position, 0)
            seen[position] = ordinal + 1
            track = (position[0], ordinal)
            self.frame.append(position[1])
            self.track.append(track)
            self._by_track.setdefault(track, {})[position[1]] = index

    def candidates(self, index: int, nearest: int, farthest: int) -> list[int]:
        """Samples of the same track at frames t - farthest ... t - nearest (earlier frames only)."""
        track, t = self.track[index], self.frame[index]
        if track is None:
            return []
        frames = self._by_track[track]
        return [frames[s] for s in range(t - farthest, t - nearest + 1) if s in frames]

    def draw(self, index: int, nearest: int, farthest: int) -> int | None:
        """One candidate drawn uniformly (torch's global generator, seeded per step), or None."""
        options = self.candidates(index, nearest, farthest)
        if not options:
            return None
        return options[int(torch.randint(len(options), ()))]


class HierarchicalVideoLoss:
    """The HVQ objective of one video unit, over its cache (which must keep each sample's position)."""

    def __init__(self, config: HVQConfig, cache: UnitCache):
        self.config = config
        self.cache = cache
        self.timeline = FrameTimeline([call.position for call in cache.float])
        self.windows = ((config.alpha, 1, config.l_short), (config.beta, config.l_short + 1, config.l_long))

    def __call__(
        self,
        indices: Sequence[int],
        outputs: list,
        targets: list,
        rec: Tensor,
        run: Callable[[list[int]], list],
    ) -> Tensor:
        """gamma * rec plus the two triplet terms over the anchors that have a partner in each window;
        `run(indices)` gives the quantized unit's flattened outputs on cached samples of one signature."""
        learned = [
            k
            for k, out in enumerate(outputs)
            if isinstance(out, Tensor) and out.is_floating_point() and out.requires_grad
        ]
        positive = torch.cat([outputs[k].float().flatten(1) for k in learned], dim=1)
        anchor = torch.cat([targets[k].float().flatten(1) for k in learned], dim=1)
        if len(positive) != len(indices):
            raise MQSAM2Error(
                f"unit {self.cache.unit_name}: HVQ needs one output row per cached sample, got {len(positive)} "
                f"rows for {len(indices)} samples"
            )
        total = self.config.gamma * rec
        for weight, nearest, farthest in self.windows:
            if weight == 0:
                continue
            partners = [self.timeline.draw(i, nearest, farthest) for i in indices]
            rows = [row for row, partner in enumerate(partners) if partner is not None]
            if not rows:
                continue
            negative = self._rows_of([partners[row] for row in rows], run, learned)
            term = triplet_loss(anchor[rows], positive[rows], negative, self.config.margin)
            total = total + weight * term
        return total

    def _rows_of(self, indices: list[int], run: Callable[[list[int]], list], learned: list[int]) -> Tensor:
        """Quantized outputs of arbitrary cached samples, one forward per signature, rows in `indices` order."""
        by_group: dict[int, list[int]] = {}
        for index in dict.fromkeys(indices):
            by_group.setdefault(self.cache.group_of[index], []).append(index)
        row_of: dict[int, Tensor] = {}
        for members in by_group.values():
            leaves = run(members)
            rows = torch.cat([leaves[k].float().flatten(1) for k in learned], dim=1)
            row_of.update(zip(members, rows, strict=True))
        return torch.stack([row_of[i] for i in indices])
