"""`python -m mqsam2.deploy.onnx.track`: track the objects of a first-frame mask through a folder of frames
with an exported ONNX video tracker (ONNX Runtime, CPU) and write the masks as palette PNGs.

    python -m mqsam2.deploy.onnx.track --tracker runs/<name>/deploy/onnx/tracker \\
        --frames JPEGImages/480p/<clip> --prompt-mask Annotations/480p/<clip>/00000.png --out masks/<clip>

Frames are numbered JPEGs (00000.jpg, ...), prepared as sam2's loader prepares them (RGB, resized to the
model's S x S, /255, ImageNet mean and std); every object id of the prompt mask (a DAVIS palette PNG named
like its frame) is prompted with its bounding box on that frame. Output: one PNG per frame, named like the
frame, pixel value = object id (0 background; where objects overlap, the larger id).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mqsam2.cli import OneLineArgumentParser, run_command
from mqsam2.data.files import numbered_files, read_mask_png
from mqsam2.deploy.onnx.tracker import POLICIES, OnnxVideoTracker, TrackPrompt
from mqsam2.errors import MQSAM2Error

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
DAVIS_PALETTE = [
    value for i in range(256) for value in ((i & 1) * 128, (i >> 1 & 1) * 128, (i >> 2 & 1) * 128)
]


def prepare_frame(path: Path, image_size: int) -> np.ndarray:
    """[3, S, S] float32: sam2's frame preparation (`mqsam2.data.loaders.load_frame`'s arithmetic)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((image_size, image_size))
        pixels = np.asarray(rgb).transpose(2, 0, 1)
    return ((pixels / np.float64(255.0)).astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD


def box_prompts(mask: np.ndarray, frame: int) -> dict[int, TrackPrompt]:
    """A box prompt (x0, y0, x1 + 1, y1 + 1) per object id of an integer mask, as `Prompt.from_mask` makes."""
    prompts = {}
    for obj_id in (int(v) for v in np.unique(mask) if v != 0):
        ys, xs = np.nonzero(mask == obj_id)
        prompts[obj_id] = TrackPrompt(frame, box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return prompts


def track_folder(
    tracker: OnnxVideoTracker, frames_dir: Path, prompt_mask: Path, out: Path
) -> tuple[int, list[int]]:
    """Track and write the masks; returns (frames written, object ids)."""
    frames = numbered_files(frames_dir, ".jpg")
    if not frames:
        raise MQSAM2Error(f"{frames_dir} holds no numbered .jpg frames (00000.jpg, ...): check --frames")
    numbers = list(frames)
    if not prompt_mask.stem.isdigit() or int(prompt_mask.stem) not in frames:
        raise MQSAM2Error(f"{prompt_mask.name} names no frame of {frames_dir}: name the mask like its frame")
    mask = read_mask_png(prompt_mask)
    with Image.open(frames[numbers[0]]) as first:
        video_size = (first.height, first.width)
    if mask.shape != video_size:
        raise MQSAM2Error(
            f"{prompt_mask} is {mask.shape[0]}x{mask.shape[1]}, the frames {video_size[0]}x{video_size[1]}"
        )
    prompts = box_prompts(mask, numbers.index(int(prompt_mask.stem)))
    if not prompts:
        raise MQSAM2Error(f"{prompt_mask} has no object (every pixel is 0): give a mask with object ids")
    images = (prepare_frame(frames[n], tracker.image_size) for n in numbers)
    masks = tracker.track(images, video_size, prompts)
    out.mkdir(parents=True, exist_ok=True)
    for t, number in enumerate(numbers):
        labels = np.zeros(video_size, np.uint8)
        for obj_id in sorted(masks):
            labels[masks[obj_id][t]] = obj_id
        image = Image.fromarray(labels, mode="P")
        image.putpalette(DAVIS_PALETTE)
        image.save(out / f"{frames[number].stem}.png")
    return len(numbers), sorted(masks)


def parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m mqsam2.deploy.onnx.track",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tracker", type=Path, required=True, help="an exported tracker (deploy/onnx/tracker)"
    )
    parser.add_argument("--frames", type=Path, required=True, help="folder of numbered JPEG frames")
    parser.add_argument("--prompt-mask", type=Path, required=True, help="palette PNG of the prompt frame")
    parser.add_argument("--out", type=Path, required=True, help="folder for the mask PNGs")
    parser.add_argument("--policy", choices=POLICIES, help="memory policy (default: the exported model's)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    return parser


def _track(args) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    tracker = OnnxVideoTracker(args.tracker, threads=args.threads, policy=args.policy)
    count, objects = track_folder(tracker, args.frames, args.prompt_mask, args.out)
    print(f"wrote {count} masks of objects {', '.join(map(str, objects))} to {args.out} ({tracker.policy})")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(lambda: _track(args), on_stop="the masks are incomplete; run the command again")


if __name__ == "__main__":
    sys.exit(main())
