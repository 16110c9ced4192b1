"""sam2's video predictor fed from tensors, so calibration, evaluation and benchmarks share one entry point."""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass

import sam2.sam2_video_predictor as sam2_video
import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor

from mqsam2.errors import MQSAM2Error


@dataclass(frozen=True)
class Prompt:
    """One object's prompt on one frame: a box (xyxy, video pixels), a mask, or clicks."""

    frame: int
    box: tuple[float, float, float, float] | None = None
    mask: torch.Tensor | None = None
    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @staticmethod
    def from_mask(frame: int, mask: torch.Tensor, kind: str = "box") -> Prompt:
        """The prompt the papers use: the GT mask's bounding box (or the mask, or its innermost click)."""
        if not mask.any():
            raise MQSAM2Error(f"cannot prompt on frame {frame}: the object's mask is empty there")
        if kind == "mask":
            return Prompt(frame, mask=mask.bool())
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if kind == "box":
            return Prompt(
                frame, box=(xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
            )
        if kind == "point":
            inside = _innermost_point(mask)
            return Prompt(frame, points=inside[None].float(), labels=torch.ones(1, dtype=torch.int32))
        raise MQSAM2Error(f"unknown prompt kind {kind!r}: use box, mask or point")


def _innermost_point(mask: torch.Tensor) -> torch.Tensor:
    """The (x, y) pixel farthest from the background, so a click lands inside thin or concave objects."""
    inside = mask.bool().float()[None, None]
    depth = inside.clone()
    eroded = inside
    while eroded.any():
        eroded = -torch.nn.functional.max_pool2d(-eroded, 3, stride=1, padding=1)
        depth = depth + eroded
    y, x = divmod(int(depth.flatten().argmax()), mask.shape[-1])
    return torch.tensor([x, y])


def _memory_in_query_dtype(_module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """sam2 stores memory features in bf16 and relies on autocast: on a frame before an object's prompt frame
    no object pointer (float32) joins the memory, which then reaches memory attention in bf16. Cast it to the
    queries' dtype (exact for bf16 -> float32), as the float32 pointers do on every other frame."""
    curr, memory = kwargs.get("curr"), kwargs.get("memory")
    if isinstance(memory, torch.Tensor) and isinstance(curr, list | tuple) and memory.dtype != curr[0].dtype:
        kwargs = {**kwargs, "memory": memory.to(curr[0].dtype)}
    return args, kwargs


class VideoPredictor(SAM2VideoPredictor):
    """Stock SAM2VideoPredictor plus an init from in-memory frames; memory policies subclass it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_attention.register_forward_pre_hook(_memory_in_query_dtype, with_kwargs=True)

    @torch.inference_mode()
    def init_state_from_frames(
        self, frames: torch.Tensor, video_size: tuple[int, int], offload_state_to_cpu: bool = False
    ) -> dict:
        """The same state `init_state` builds, from frames already resized and normalised [T,3,S,S]."""
        if frames.ndim != 4 or frames.shape[1:] != (3, self.image_size, self.image_size):
            raise MQSAM2Error(
                f"frames must be [T, 3, {self.image_size}, {self.image_size}] (the model's input size), "
                f"got {list(frames.shape)}"
            )
        device = self.device
        state = {
            "images": frames.to(device),
            "num_frames": len(frames),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": int(video_size[0]),
            "video_width": int(video_size[1]),
            "device": device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
        self._get_image_feature(state, frame_idx=0, batch_size=1)
        return state

    @torch.inference_mode()
    def add_prompt(self, state: dict, obj_id: int, prompt: Prompt) -> None:
        if prompt.mask is not None:
            self.add_new_mask(state, prompt.frame, obj_id, prompt.mask)
        else:
            self.add_new_points_or_box(
                state, prompt.frame, obj_id, points=prompt.points, labels=prompt.labels, box=prompt.box
            )

    @torch.inference_mode()
    def track_clip(
        self, frames: torch.Tensor, video_size: tuple[int, int], prompts: dict[int, Prompt]
    ) -> torch.Tensor:
        """Masks [O, T, H, W] (bool, video resolution, objects in `prompts` order) after one forward pass.

        Mirrors sam2's VOS evaluation: every object prompted on its frame, one propagation from the
        earliest prompt; frames before an object's prompt frame are empty for that object.
        """
        if not prompts:
            raise MQSAM2Error("a video needs a prompt on at least one frame for at least one object")
        state = self.init_state_from_frames(frames, video_size)
        for obj_id, prompt in prompts.items():
            self.add_prompt(state, obj_id, prompt)
        obj_ids = list(prompts)
        masks = torch.zeros(len(obj_ids), len(frames), *video_size, dtype=torch.bool)
        with without_sam2_bar():
            for frame_idx, out_ids, logits in self.propagate_in_video(state):
                for row, obj_id in enumerate(out_ids):
                    if frame_idx >= prompts[obj_id].frame:
                        masks[obj_ids.index(obj_id), frame_idx] = logits[row, 0].cpu() > 0
        return masks


@contextlib.contextmanager
def without_sam2_bar() -> Iterator[None]:
    """sam2 draws a `propagate in video` progress bar for every propagation (dozens per evaluation, each one
    model, policy and clip): its callers report their own progress, one line per pass, instead."""
    bar = sam2_video.tqdm
    sam2_video.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        sam2_video.tqdm = bar


def state_nbytes(state: dict, skip: tuple[str, ...] = ("images",)) -> int:
    """Bytes of tensor storage an inference state holds (each storage once), without the input frames.

    Walks dicts, lists, tuples and dataclasses (memory banks live inside the per-object outputs), so it measures
    what a memory policy keeps alive rather than what the allocator happens to cache.
    """
    seen: dict[tuple, int] = {}
    pending: list = [v for k, v in state.items() if k not in skip]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[(item.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif is_dataclass(item) and not isinstance(item, type):
            pending.extend(getattr(item, f.name) for f in fields(item))
    return sum(seen.values())
