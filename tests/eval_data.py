"""Small synthetic VideoClip / ImageSample objects built in memory, for the evaluation tests."""

from __future__ import annotations

import torch

from mqsam2.data import ImageSample, VideoClip
from mqsam2.data.loaders import IMAGENET_MEAN, IMAGENET_STD

EVAL_IMAGE_SIZE = 64  # the smallest size sam2's configs allow: keeps every tracking test in seconds on a CPU


def normalise(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """[T, 3, H, W] in [0, 1] -> sam2's input: resized to size x size and normalised."""
    resized = torch.nn.functional.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
    return (resized - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def moving_boxes(num_frames: int, height: int, width: int, num_objects: int, seed: int) -> torch.Tensor:
    """Bool masks [O, T, H, W] of rectangles drifting across the frame."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_objects, num_frames, height, width, dtype=torch.bool)
    for o in range(num_objects):
        h, w = (
            int(torch.randint(height // 5, height // 2, (1,), generator=g)),
            int(torch.randint(width // 5, width // 2, (1,), generator=g)),
        )
        y, x = (
            int(torch.randint(0, height - h, (1,), generator=g)),
            int(torch.randint(0, width - w, (1,), generator=g)),
        )
        dy, dx = (torch.randint(-2, 3, (2,), generator=g)).tolist()
        for t in range(num_frames):
            y0 = min(max(y + dy * t, 0), height - h)
            x0 = min(max(x + dx * t, 0), width - w)
            masks[o, t, y0 : y0 + h, x0 : x0 + w] = True
    return masks


def render(masks: torch.Tensor, seed: int) -> torch.Tensor:
    """RGB frames [T, 3, H, W] in [0, 1]: a noisy background with one flat colour per object."""
    g = torch.Generator().manual_seed(seed)
    num_objects, num_frames, height, width = masks.shape
    frames = 0.3 + 0.2 * torch.rand(num_frames, 3, height, width, generator=g)
    for o in range(num_objects):
        colour = torch.rand(3, generator=g).view(3, 1, 1)
        frames = torch.where(masks[o][:, None], colour, frames)
    return frames


def make_clip(
    video_id: str = "clip0",
    num_frames: int = 6,
    num_objects: int = 2,
    orig_size: tuple[int, int] = (48, 64),
    image_size: int = EVAL_IMAGE_SIZE,
    seed: int = 0,
) -> VideoClip:
    masks = moving_boxes(num_frames, *orig_size, num_objects, seed)
    return VideoClip(
        video_id=video_id,
        frames=normalise(render(masks, seed), image_size),
        masks=masks,
        obj_ids=list(range(1, num_objects + 1)),
        annotated=torch.ones(num_frames, dtype=torch.bool),
        orig_size=orig_size,
        frame_indices=list(range(num_frames)),
        fps=24.0,
        split="val",
    )


def make_image(
    image_id: int, num_objects: int = 2, orig_size=(48, 64), image_size: int = EVAL_IMAGE_SIZE
) -> ImageSample:
    masks = moving_boxes(1, *orig_size, num_objects, seed=100 + image_id)[:, 0]
    boxes = []
    for mask in masks:
        ys, xs = mask.nonzero(as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return ImageSample(
        image_id=image_id,
        image=normalise(render(masks[:, None], seed=image_id), image_size)[0],
        boxes=torch.tensor(boxes, dtype=torch.float32),
        masks=masks,
        category_ids=[1 + o % 2 for o in range(num_objects)],
        orig_size=orig_size,
    )
