"""DAVIS (and DAVIS-like layouts such as MOSE) to shards: JPEGImages/<res>/<video>/<frame>.jpg frames and
Annotations/<res>/<video>/<frame>.png palette PNGs whose pixel values are object ids (0 is background).
Frames without a PNG are unannotated (test-dev ships the first frame only)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from mqsam2.data.build import BuildReport, build_shards, chunk_tasks, claim_output
from mqsam2.data.files import check_mask_size, numbered_files, read_frames, read_mask_png
from mqsam2.data.format import DataError, Sample, VideoRecord, encode_mask, encode_video

FPS = 24.0


def video_samples(
    video: str, root: Path, resolution: str, split: str, fps: float, clip_len: int
) -> list[Sample]:
    frame_dir = root / "JPEGImages" / resolution / video
    mask_dir = root / "Annotations" / resolution / video
    paths, jpegs, size = read_frames(frame_dir)
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: no annotation folder for video {video}; add it or leave the video out")
    labels = {}
    for frame, png in numbered_files(mask_dir, ".png").items():
        if frame not in paths:
            raise DataError(f"{png}: has no frame {frame} in {frame_dir}")
        labels[frame] = read_mask_png(png)
        check_mask_size(labels[frame], png, size, paths[frame])
    obj_ids = sorted({int(v) for label in labels.values() for v in np.unique(label) if v != 0})
    masks = {obj: {frame: encode_mask(label == obj) for frame, label in labels.items()} for obj in obj_ids}
    record = VideoRecord(video, list(paths), jpegs, sorted(labels), masks, size, fps, split, source="davis")
    return [encode_video(clip) for clip in record.clips(clip_len)]


def convert_davis(
    root: str | Path,
    out_dir: str | Path,
    split: str = "val",
    resolution: str = "480p",
    fps: float = FPS,
    clip_len: int = 0,
    shard_size: int = 8,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
) -> BuildReport:
    """Shards out/davis-%06d.tar. Videos come from ImageSets/2017/<split>.txt when the file exists,
    otherwise every folder under Annotations/<resolution>."""
    root, out = Path(root), Path(out_dir)
    frames, annotations = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    if not frames.is_dir() or not annotations.is_dir():
        raise DataError(
            f"{root}: unknown layout: DAVIS needs JPEGImages/{resolution}/<video>/ and "
            f"Annotations/{resolution}/<video>/ under the root (other resolutions: --resolution)"
        )
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if listing.is_file():
        videos = sorted({line.strip() for line in listing.read_text().splitlines() if line.strip()})
    else:
        videos = sorted(p.name for p in annotations.iterdir() if p.is_dir())
    settings = dict(source="davis", root=root.resolve(), split=split, resolution=resolution, fps=fps)
    claim_output(out, dict(settings, clip_len=clip_len, shard_size=shard_size))
    make = partial(video_samples, root=root, resolution=resolution, split=split, fps=fps, clip_len=clip_len)
    return build_shards(
        chunk_tasks(out, "davis", videos, shard_size, make), workers, skip_bad, progress, "davis"
    )
