"""J&F for video object segmentation, exactly as DAVIS defines it (torchmetrics has no J&F).

J is the region IoU; F is the boundary F-measure: one-pixel boundary maps (DAVIS's seg2bmap), matched within a
disk of radius ceil(0.008 * image diagonal). A frame where both masks are empty scores 1 for both. Per track the
frames are averaged; J, F and J&F = (J + F) / 2 are then averaged over tracks (objects).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mqsam2.errors import MQSAM2Error

DAVIS_BOUND_TH = 0.008


def region_similarity(pred: Tensor, gt: Tensor) -> Tensor:
    """Per-frame Jaccard index of bool masks [..., H, W] (float64); 1 where both masks are empty."""
    inter = (pred & gt).flatten(-2).sum(-1).double()
    union = (pred | gt).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def boundary_map(mask: Tensor) -> Tensor:
    """DAVIS's seg2bmap: pixels whose right, lower or lower-right neighbour differs (last row/column: one side)."""
    east = F.pad(mask[..., :, 1:], (0, 1))
    south = F.pad(mask[..., 1:, :], (0, 0, 0, 1))
    south_east = F.pad(mask[..., 1:, 1:], (0, 1, 0, 1))
    bmap = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    bmap[..., -1, :] = mask[..., -1, :] ^ east[..., -1, :]
    bmap[..., :, -1] = mask[..., :, -1] ^ south[..., :, -1]
    bmap[..., -1, -1] = False
    return bmap


def boundary_radius(height: int, width: int, bound_th: float = DAVIS_BOUND_TH) -> int:
    """The matching tolerance in pixels: a fraction of the diagonal (< 1) or a pixel count (>= 1)."""
    return int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.hypot(height, width))


def _dilate(bmap: Tensor, radius: int) -> Tensor:
    """Binary dilation by the disk x^2 + y^2 <= r^2 (skimage's disk), exact and cheap on a CPU.

    The disk is a stack of horizontal runs: for each row offset dy, a run of half-width isqrt(r^2 - dy^2) found
    with a running sum along x, shifted by dy and OR-ed in. O(r * H * W) integer work instead of O(r^2 * H * W).
    """
    height, width = bmap.shape[-2:]
    csum = F.pad(bmap.int(), (radius + 1, radius)).cumsum(-1)
    out = torch.zeros_like(bmap)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        run = (
            csum[..., radius + 1 + half : radius + 1 + half + width]
            - csum[..., radius - half : radius - half + width]
        ) > 0
        out[..., max(-dy, 0) : height - max(dy, 0), :] |= run[..., max(dy, 0) : height + min(dy, 0), :]
    return out


def boundary_f_measure(pred: Tensor, gt: Tensor, bound_th: float = DAVIS_BOUND_TH) -> Tensor:
    """Per-frame DAVIS boundary F-measure of bool masks [..., H, W] (float64)."""
    radius = boundary_radius(*pred.shape[-2:], bound_th)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred = pred_b.flatten(-2).sum(-1).double()
    n_gt = gt_b.flatten(-2).sum(-1).double()
    precision = (pred_b & _dilate(gt_b, radius)).flatten(-2).sum(-1) / n_pred.clamp(min=1)
    recall = (gt_b & _dilate(pred_b, radius)).flatten(-2).sum(-1) / n_gt.clamp(min=1)
    # One empty boundary gives precision or recall 0, hence F = 0, as in DAVIS; both empty give 1.
    f = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0
    )
    return torch.where((n_pred == 0) & (n_gt == 0), torch.ones_like(f), f)


def check_masks(pred: Tensor, target: Tensor, what: str = "masks") -> None:
    """Bool [T, H, W] pairs of equal shape, or a one-line error that says what to fix."""
    for name, mask in (("pred", pred), ("target", target)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 3 or not mask.shape[0]:
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise MQSAM2Error(
                f"{what}: {name} must be a bool mask [T, H, W] with T >= 1 (threshold logits), got {got}"
            )
    if pred.shape != target.shape:
        raise MQSAM2Error(
            f"{what}: pred {list(pred.shape)} and target {list(target.shape)} differ; compare at the same resolution"
        )


class JandF(Metric):
    """DAVIS J, F and J&F averaged over object tracks; `update(pred, target)` takes one track's bool [T, H, W]."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, bound_th: float = DAVIS_BOUND_TH, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bound_th = bound_th
        self.add_state("j_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("f_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tracks", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        check_masks(pred, target, "JandF.update")
        self.j_sum += region_similarity(pred, target).mean()
        self.f_sum += boundary_f_measure(pred, target, self.bound_th).mean()
        self.tracks += 1

    def compute(self) -> dict[str, Tensor]:
        if self.tracks == 0:
            raise MQSAM2Error("JandF has no tracks to average: call update(pred, target) at least once")
        j, f = self.j_sum / self.tracks, self.f_sum / self.tracks
        return {"J": j, "F": f, "J&F": (j + f) / 2}
