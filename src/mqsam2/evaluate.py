"""Evaluation without Lightning: video J&F and image mask mAP, against labels or against a reference model.

Video protocol (method.md §7): each object is prompted on its first annotated frame where it is visible, one
propagation runs, and J/F are scored per object over the annotated frames after its prompt frame. Fidelity
(reference = the FP model or its masks) needs no labels beyond the prompts: it scores every frame after the
prompt frame, where the reference has a mask on each.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from sam2.modeling.sam2_base import SAM2Base
from torch import Tensor

from mqsam2.errors import MQSAM2Error
from mqsam2.memory.batched import batched_tracking_supported, track_clips
from mqsam2.memory.policies import using_memory_policy
from mqsam2.memory.predictor import Prompt, VideoPredictor
from mqsam2.metrics.coco import mask_map
from mqsam2.metrics.jandf import JandF

log = logging.getLogger(__name__)

PromptKind = Literal["box", "mask", "point"]
VideoReference = Literal["gt"] | VideoPredictor | Sequence[Tensor]
ImageReference = Literal["gt"] | SAM2Base


def check_clip(clip) -> None:
    """The clip's frames, masks and annotation flags agree, or a one-line error naming the video."""
    num_frames = len(clip.frames)
    expected = (len(clip.obj_ids), num_frames, *(int(v) for v in clip.orig_size))
    if clip.masks.dtype != torch.bool or tuple(clip.masks.shape) != expected:
        raise MQSAM2Error(
            f"video {clip.video_id}: masks must be bool [objects, frames, H, W] = {list(expected)}, "
            f"got {clip.masks.dtype} {list(clip.masks.shape)}"
        )
    if tuple(clip.annotated.shape) != (num_frames,):
        raise MQSAM2Error(
            f"video {clip.video_id}: `annotated` must flag each of the {num_frames} frames, "
            f"got shape {list(clip.annotated.shape)}"
        )


def clip_prompts(clip, kind: PromptKind = "box", max_objects: int | None = None) -> dict[int, Prompt]:
    """Each object's prompt on its first annotated frame where it is visible; objects never visible are skipped
    (and objects beyond `max_objects`, which calibration uses to bound its cost)."""
    check_clip(clip)
    visible = clip.masks.flatten(2).any(-1) & clip.annotated.bool()[None]  # [O, T]
    prompts = {}
    for row, obj_id in enumerate(clip.obj_ids):
        if max_objects is not None and len(prompts) == max_objects:
            break
        frames = visible[row].nonzero().flatten()
        if len(frames):
            frame = int(frames[0])
            prompts[int(obj_id)] = Prompt.from_mask(frame, clip.masks[row, frame], kind)
        else:
            log.warning(
                "video %s: object %s is never visible on an annotated frame; not evaluated",
                clip.video_id,
                obj_id,
            )
    if not prompts:
        raise MQSAM2Error(
            f"video {clip.video_id} has no prompt on any frame: no object is visible on an annotated frame "
            "(drop the video or annotate its first frame)"
        )
    return prompts


def track(predictor: VideoPredictor, clip, prompts: dict[int, Prompt]) -> Tensor:
    """Predicted masks bool [O, T, H, W] in `clip.obj_ids` order (unprompted objects stay empty), on the CPU."""
    return track_all(predictor, [clip], [prompts])[0].cpu()


def track_all(
    predictor: VideoPredictor, clips: Sequence, prompts: Sequence[dict[int, Prompt]], batch_objects: int = 64
) -> list[Tensor]:
    """Each clip's predicted masks bool [O, T, H, W] (`clip.obj_ids` order), on the predictor's device: every
    object of every clip stepped in batches where the model allows it (`mqsam2.memory.batched`), one object
    at a time otherwise. Both give the masks of sam2's per-object tracking."""
    if batched_tracking_supported(predictor, prompts):
        return track_clips(predictor, clips, prompts, batch_objects)
    tracked = []
    for clip, clip_prompts_ in zip(clips, prompts, strict=True):
        masks = predictor.track_clip(clip.frames, tuple(int(v) for v in clip.orig_size), clip_prompts_)
        full = torch.zeros_like(clip.masks, device=masks.device)
        full[[list(clip.obj_ids).index(obj_id) for obj_id in clip_prompts_]] = masks
        tracked.append(full)
    return tracked


def score_tracks(
    metric: JandF, pred: Tensor, target: Tensor, clip, prompts: dict[int, Prompt], annotated_only: bool
) -> None:
    """Add each prompted object's track to the metric: frames after its prompt (annotated ones, for labels)."""
    if pred.shape != clip.masks.shape or target.shape != clip.masks.shape:
        raise MQSAM2Error(
            f"video {clip.video_id}: masks must be [objects, frames, H, W] = {list(clip.masks.shape)}, "
            f"got prediction {list(pred.shape)} and reference {list(target.shape)}"
        )
    target = target.to(pred.device)
    after = torch.arange(len(clip.frames), device=pred.device)
    annotated = clip.annotated.bool().to(pred.device)
    for obj_id, prompt in prompts.items():
        frames = after > prompt.frame
        if annotated_only:
            frames &= annotated
        if frames.any():
            row = list(clip.obj_ids).index(obj_id)
            metric.update(pred[row, frames], target[row, frames])


def _jandf(
    preds: Sequence[Tensor],
    targets: Sequence[Tensor],
    clips: Sequence,
    prompts: Sequence,
    annotated_only: bool,
) -> dict[str, float]:
    metric = JandF().to(preds[0].device)
    for pred, target, clip, clip_prompt in zip(preds, targets, clips, prompts, strict=True):
        score_tracks(metric, pred, target, clip, clip_prompt, annotated_only)
    if not int(metric.tracks):
        raise MQSAM2Error("no object has an evaluation frame after its prompt frame: nothing to score")
    return {**{k: float(v) for k, v in metric.compute().items()}, "objects": int(metric.tracks)}


def evaluate_video(
    predictor: VideoPredictor, clips: Sequence, prompt: PromptKind = "box", reference: VideoReference = "gt"
) -> dict[str, float]:
    """J, F, J&F averaged over objects, against labels ("gt") or a reference (FP predictor, or its masks per clip).

    The predictor's memory policy is whatever it was built with (see `mqsam2.memory.using_memory_policy`).
    """
    if not clips:
        raise MQSAM2Error("no video clips to evaluate: the validation set is empty")
    if isinstance(reference, str) and reference != "gt":
        raise MQSAM2Error(f"unknown reference {reference!r}: use 'gt', a predictor or masks per clip")
    if not isinstance(reference, str | VideoPredictor) and len(reference) != len(clips):
        raise MQSAM2Error(
            f"reference masks cover {len(reference)} clips, expected one per clip ({len(clips)})"
        )
    prompts = [clip_prompts(clip, prompt) for clip in clips]
    preds = track_all(predictor, clips, prompts)
    if isinstance(reference, str):
        targets = [clip.masks for clip in clips]
    elif isinstance(reference, VideoPredictor):
        targets = track_all(reference, clips, prompts)
    else:
        targets = reference
    return _jandf(preds, targets, clips, prompts, annotated_only=isinstance(reference, str))


def evaluate_video_grid(
    models: Mapping[str, VideoPredictor],
    clips: Sequence,
    fp_model: VideoPredictor | None = None,
    policies: Sequence[str] = ("fifo", "sis"),
    prompt: PromptKind = "box",
    device: torch.device | str = "cpu",
) -> list[dict[str, float | str]]:
    """One row per (model, memory policy): J, F, J&F against labels and, given `fp_model`, `fidelity/...` against it.

    The demo's table (FP, W4A4, mixed precision x SIS off/on). Clips are taken one at a time (a lazy set is read
    and decoded clip by clip) and each model tracks each clip once per policy; the FP reference runs under the
    same policy as the rows it scores, so fidelity isolates quantization damage. Under torch.distributed every
    rank passes its share of the clips and the rows cover all ranks' clips (the metrics sum across ranks).
    """
    if not clips and not _distributed():
        raise MQSAM2Error("no video clips to evaluate: the validation set is empty")
    scores = {
        (name, policy): (JandF().to(device), JandF().to(device) if fp_model is not None else None)
        for policy in policies
        for name in models
    }
    reference_name = next((name for name, model in models.items() if model is fp_model), "the FP reference")
    for number, clip in enumerate(clips, 1):
        prompts = clip_prompts(clip, prompt)
        for policy in policies:
            reference = None
            if fp_model is not None:
                log.info("evaluate: %s, memory %s, clip %d of %d", reference_name, policy, number, len(clips))
                with using_memory_policy(fp_model, policy):
                    reference = track(fp_model, clip, prompts)
            for name, model in models.items():
                if model is fp_model:
                    pred = reference
                else:
                    log.info("evaluate: %s, memory %s, clip %d of %d", name, policy, number, len(clips))
                    with using_memory_policy(model, policy):
                        pred = track(model, clip, prompts)
                vs_labels, vs_fp = scores[name, policy]
                score_tracks(vs_labels, pred, clip.masks, clip, prompts, annotated_only=True)
                if vs_fp is not None:
                    score_tracks(vs_fp, pred, reference, clip, prompts, annotated_only=False)
    rows = []
    for (name, policy), (vs_labels, vs_fp) in scores.items():
        row = {"model": name, "memory": policy, **_summary(vs_labels)}
        if vs_fp is not None:
            row |= {f"fidelity/{k}": v for k, v in _summary(vs_fp).items() if k != "objects"}
        rows.append(row)
    return rows


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _summary(metric: JandF) -> dict[str, float]:
    """J, F, J&F and the object count of all ranks' tracks."""
    tracks = metric.tracks.clone()
    if _distributed():
        dist.all_reduce(tracks)
    if not int(tracks):
        raise MQSAM2Error("no object has an evaluation frame after its prompt frame: nothing to score")
    return {**{k: float(v) for k, v in metric.compute().items()}, "objects": int(tracks)}


def evaluate_images(
    model: SAM2Base,
    images: Sequence,
    detections: str | Path | Sequence[dict] | None = None,
    reference: ImageReference = "gt",
) -> dict[str, float]:
    """COCO segm stats (mAP, mAP50, ...) of box-prompted masks, against labels ("gt") or the FP model's masks."""
    if isinstance(reference, str) and reference != "gt":
        raise MQSAM2Error(f"unknown reference {reference!r}: use 'gt' or the FP model")
    return mask_map(model, images, detections, reference=None if isinstance(reference, str) else reference)
