"""Batched tracking: every object of many clips stepped in one batch per frame, with the per-object semantics of
sam2's video predictor, so a grid's evaluation and calibration passes run a few large batches instead of
thousands of batch-1 steps.

sam2 1.1.0 tracks each object alone (`propagate_in_video` loops over objects at batch 1), so an object's masks
depend on its own prompt and memory bank only. `SAM2Base.track_step` at batch B is B such tracks side by side
whenever the B memory banks have the same layout (which frames are memories, where the object pointers sit in
time): every module is per-sample, and the object-pointer temporal encoding depends on the layout alone. The
layout of a track is fixed by its clip's length, its clip's first prompt frame (where propagation starts) and
its own prompt frame, so objects that agree on those three are stepped together, across clips. The prompt
steps run first, as `add_new_points_or_box` does before propagation, so a track that starts before its own
prompt frame sees that frame's memory, as in sam2.

What is batched must not depend on the batch: the naive dynamic quantizer takes one range per batch row while
the tracker runs (`mqsam2.reconstruct.positions.current_rows`; the image encoder then takes one frame per
call), and memory policies that choose memories from the bank's contents are tracked object by object instead
(`batched_tracking_supported`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sam2.utils.misc import fill_holes_in_mask_scores
from torch import Tensor

from mqsam2.memory.predictor import Prompt, VideoPredictor
from mqsam2.quant.quantizer import ActQuantizer
from mqsam2.reconstruct.positions import Position, batch_rows

_ONE_AT_A_TIME: ContextVar[bool] = ContextVar("mqsam2_one_object_at_a_time", default=False)


@contextlib.contextmanager
def one_object_at_a_time() -> Iterator[None]:
    """Inside the block every tracking pass takes sam2's own path, one object at a time (the engine before
    batching, which `benchmarks/grid.py` measures side by side)."""
    token = _ONE_AT_A_TIME.set(True)
    try:
        yield
    finally:
        _ONE_AT_A_TIME.reset(token)


def batched_tracking_supported(model: VideoPredictor, prompts: Sequence[dict[int, Prompt]]) -> bool:
    """Whether `track_clips` may batch: FIFO memory (stock sam2), no mask prompts and no non-overlap constraint
    (which couples the objects of a frame), and not inside `one_object_at_a_time`."""
    if _ONE_AT_A_TIME.get():
        return False
    if type(model) is not VideoPredictor or getattr(model, "non_overlap_masks", False):
        return False
    return all(p.mask is None for clip_prompts in prompts for p in clip_prompts.values())


def prompt_points(prompt: Prompt, video_size: tuple[int, int], image_size: int) -> tuple[Tensor, Tensor]:
    """The prompt as sam2's point inputs ([P, 2] coordinates at model resolution, [P] labels): a box is its two
    corners labelled 2 and 3 before any clicks, as `add_new_points_or_box` builds it."""
    points = torch.zeros(0, 2) if prompt.points is None else prompt.points.float().reshape(-1, 2)
    labels = torch.zeros(0, dtype=torch.int32) if prompt.labels is None else prompt.labels.int().reshape(-1)
    if prompt.box is not None:
        points = torch.cat([torch.tensor(prompt.box, dtype=torch.float32).reshape(2, 2), points])
        labels = torch.cat([torch.tensor([2, 3], dtype=torch.int32), labels])
    height, width = video_size
    return points / torch.tensor([width, height]) * image_size, labels


@dataclass
class _Group:
    """Tracks stepped together: (clip, object row) pairs that share clip length, start and prompt frame."""

    frames: int
    start: int
    prompt: int
    rows: list[tuple[int, int]] = field(default_factory=list)
    points: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    output: dict = field(default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}})


def _groups(
    model: VideoPredictor, clips: Sequence, prompts: Sequence[dict], batch_objects: int
) -> list[_Group]:
    by_layout: dict[tuple, list[_Group]] = {}
    for index, (clip, clip_prompts) in enumerate(zip(clips, prompts, strict=True)):
        start = min(p.frame for p in clip_prompts.values())
        size = tuple(int(v) for v in clip.orig_size)
        for obj_id, prompt in clip_prompts.items():
            points, labels = prompt_points(prompt, size, model.image_size)
            key = (len(clip.frames), start, prompt.frame, len(labels))
            chunks = by_layout.setdefault(key, [])
            if not chunks or len(chunks[-1].rows) == batch_objects:
                chunks.append(_Group(len(clip.frames), start, prompt.frame))
            group = chunks[-1]
            group.rows.append((index, list(clip.obj_ids).index(obj_id)))
            group.points.append(points)
            group.labels.append(labels)
    return [group for chunks in by_layout.values() for group in chunks]


class _Features:
    """The image encoder's output for one frame index of several clips, computed in chunks and gathered per
    track (the encoder runs once per clip and frame, however many objects read it)."""

    def __init__(self, model: VideoPredictor, clips: Sequence, frame: int, needed: list[int], chunk: int):
        device = model.device
        self.position = {clip: k for k, clip in enumerate(needed)}
        outputs = []
        for begin in range(0, len(needed), chunk):
            part = needed[begin : begin + chunk]
            with batch_rows([(clip, frame) for clip in part]):
                images = torch.stack([clips[clip].frames[frame] for clip in part]).to(device).float()
                outputs.append(model.forward_image(images))
        self.fpn = [
            torch.cat([o["backbone_fpn"][i] for o in outputs]) for i in range(len(outputs[0]["backbone_fpn"]))
        ]
        self.pos = [
            torch.cat([o["vision_pos_enc"][i] for o in outputs])
            for i in range(len(outputs[0]["vision_pos_enc"]))
        ]

    def for_rows(self, model: VideoPredictor, clips: list[int]) -> tuple[list, list, list]:
        index = torch.tensor([self.position[c] for c in clips], device=self.fpn[0].device)
        backbone = {
            "backbone_fpn": [x.index_select(0, index) for x in self.fpn],
            "vision_pos_enc": [x.index_select(0, index) for x in self.pos],
        }
        _, feats, pos, sizes = model._prepare_backbone_features(backbone)
        return feats, pos, sizes


def _filled(model: VideoPredictor, masks: Tensor) -> Tensor:
    return fill_holes_in_mask_scores(masks, model.fill_hole_area) if model.fill_hole_area > 0 else masks


def _compact(out: dict, masks: Tensor, features: Tensor | None, pos_enc: list | None) -> dict:
    """What sam2's predictor keeps of a step: bf16 memory features, hole-filled low-res masks, pointers."""
    return {
        "maskmem_features": None if features is None else features.to(torch.bfloat16),
        "maskmem_pos_enc": pos_enc,
        "pred_masks": masks,
        "obj_ptr": out["obj_ptr"],
        "object_score_logits": out["object_score_logits"],
    }


def _prompt_step(model: VideoPredictor, group: _Group, features: _Features) -> None:
    """The prompted frame without memory, then its memory from the upsampled masks (sam2's preflight)."""
    device = model.device
    feats, pos, sizes = features.for_rows(model, [c for c, _ in group.rows])
    point_inputs = {
        "point_coords": torch.stack(group.points).to(device),
        "point_labels": torch.stack(group.labels).to(device),
    }
    out = model.track_step(
        frame_idx=group.prompt,
        is_init_cond_frame=True,
        current_vision_feats=feats,
        current_vision_pos_embeds=pos,
        feat_sizes=sizes,
        point_inputs=point_inputs,
        mask_inputs=None,
        output_dict=group.output,
        num_frames=group.frames,
        track_in_reverse=False,
        run_mem_encoder=False,
        prev_sam_mask_logits=None,
    )
    masks = _filled(model, out["pred_masks"])
    high_res = F.interpolate(
        masks, size=(model.image_size, model.image_size), mode="bilinear", align_corners=False
    )
    features_, pos_enc = model._encode_new_memory(
        current_vision_feats=feats,
        feat_sizes=sizes,
        pred_masks_high_res=high_res,
        object_score_logits=out["object_score_logits"],
        is_mask_from_pts=True,
    )
    group.output["cond_frame_outputs"][group.prompt] = _compact(out, masks, features_, pos_enc)


def _propagation_step(model: VideoPredictor, group: _Group, frame: int, features: _Features) -> Tensor:
    if frame == group.prompt:
        return group.output["cond_frame_outputs"][frame]["pred_masks"]
    feats, pos, sizes = features.for_rows(model, [c for c, _ in group.rows])
    out = model.track_step(
        frame_idx=frame,
        is_init_cond_frame=False,
        current_vision_feats=feats,
        current_vision_pos_embeds=pos,
        feat_sizes=sizes,
        point_inputs=None,
        mask_inputs=None,
        output_dict=group.output,
        num_frames=group.frames,
        track_in_reverse=False,
        run_mem_encoder=True,
    )
    masks = _filled(model, out["pred_masks"])
    group.output["non_cond_frame_outputs"][frame] = _compact(
        out, masks, out["maskmem_features"], out["maskmem_pos_enc"]
    )
    return masks


@torch.inference_mode()
def track_clips(
    model: VideoPredictor,
    clips: Sequence,
    prompts: Sequence[dict[int, Prompt]],
    batch_objects: int = 64,
    encoder_batch: int = 16,
    clip_ids: Sequence[int] | None = None,
) -> list[Tensor]:
    """Masks bool [O, T, H, W] per clip (rows in `clip.obj_ids` order, unprompted objects empty), on the model's
    device: each object prompted on its frame, one propagation per clip from its earliest prompt, frames before
    an object's prompt frame empty, as `VideoPredictor.track_clip` gives them object by object.

    `batch_objects` bounds the tracks stepped at once, `encoder_batch` the frames encoded at once; `clip_ids`
    name the clips in the recorded positions (default: their index in `clips`).
    """
    clip_ids = list(range(len(clips))) if clip_ids is None else list(clip_ids)
    clips = list(clips)  # a lazy validation set decodes a clip per access: once each, not once per frame
    if any(isinstance(m, ActQuantizer) and m.dynamic for m in model.modules()):
        encoder_batch = 1  # the image encoder merges frames and windows in dim 0: one frame per call, as sam2
    device = model.device
    masks = [
        torch.zeros(
            len(clip.obj_ids),
            len(clip.frames),
            *(int(v) for v in clip.orig_size),
            dtype=torch.bool,
            device=device,
        )
        for clip in clips
    ]
    groups = _groups(model, clips, prompts, batch_objects)

    def positions(group: _Group, frame: int) -> list[Position]:
        return [(clip_ids[c], frame) for c, _ in group.rows]

    def encode(frame: int, active: list[_Group]) -> _Features | None:
        needed = sorted({c for group in active for c, _ in group.rows})
        return _Features(model, clips, frame, needed, encoder_batch) if needed else None

    for frame in sorted({group.prompt for group in groups}):
        prompted = [group for group in groups if group.prompt == frame]
        features = encode(frame, prompted)
        for group in prompted:
            with batch_rows(positions(group, frame)):
                _prompt_step(model, group, features)
    for frame in range(max((group.frames for group in groups), default=0)):
        active = [group for group in groups if group.start <= frame < group.frames]
        if not active:
            continue
        features = encode(frame, [g for g in active if g.prompt != frame])
        for group in active:
            with batch_rows(positions(group, frame)):
                low_res = _propagation_step(model, group, frame, features)
            if frame < group.prompt:
                continue
            for (clip, row), logits in zip(group.rows, _video_res(low_res, clips, group), strict=True):
                masks[clip][row, frame] = logits[0] > 0
    return masks


def _video_res(low_res: Tensor, clips: Sequence, group: _Group) -> list[Tensor]:
    """Each track's mask logits at its clip's video size (clips of one group may differ in size)."""
    sizes = [tuple(int(v) for v in clips[c].orig_size) for c, _ in group.rows]
    if len(set(sizes)) == 1:
        size = sizes[0]
        return list(low_res if low_res.shape[-2:] == size else _resize(low_res, size))
    return [x if x.shape[-2:] == s else _resize(x[None], s)[0] for x, s in zip(low_res, sizes, strict=True)]


def _resize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
