"""SA-V to shards. Frames come from JPEGImages_24fps/<video>/<frame>.jpg; masks either from per-object PNGs
(Annotations_6fps/<video>/<obj>/<frame>.png, the val/test release) or from the sav_<video>.json manifests
(the train release: `masklet[i][k]` is the RLE of object `masklet_id[k]` at 24-fps frame 4*i)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from mqsam2.data.build import BuildReport, build_shards, chunk_tasks, claim_output
from mqsam2.data.files import check_mask_size, numbered_files, read_frames, read_mask_png
from mqsam2.data.format import DataError, Sample, VideoRecord, encode_mask, encode_video

FRAMES_DIR = "JPEGImages_24fps"
MASKS_DIR = "Annotations_6fps"
MANIFEST_GLOB = "sav_*.json"
FPS = 24.0
ANNOTATE_EVERY = 4  # SA-V masklets are at 6 fps on 24-fps frames


def png_video_samples(video_dir: Path, root: Path, split: str, clip_len: int) -> list[Sample]:
    """One video of the PNG layout; every object must have a mask on every annotated frame."""
    paths, jpegs, size = read_frames(root / FRAMES_DIR / video_dir.name)
    folders = sorted(p for p in video_dir.iterdir() if p.is_dir())
    for folder in folders:
        if not folder.name.isdigit():
            raise DataError(f"{folder}: expected an object id as the folder name (like 000)")
    objects = {int(folder.name): (folder, numbered_files(folder, ".png")) for folder in folders}
    annotated = sorted({frame for _, pngs in objects.values() for frame in pngs})
    masks: dict[int, dict] = {}
    for obj, (folder, pngs) in objects.items():
        masks[obj] = {}
        for frame in annotated:
            if frame not in pngs:
                other = next(p[frame] for _, p in objects.values() if frame in p)
                raise DataError(
                    f"{folder}: no mask for annotated frame {frame} ({other} exists); "
                    "add the missing PNG or leave the video out with --skip-bad"
                )
            if frame not in paths:
                raise DataError(
                    f"{pngs[frame]}: has no frame {frame} in {root / FRAMES_DIR / video_dir.name}"
                )
            mask = read_mask_png(pngs[frame])
            check_mask_size(mask, pngs[frame], size, paths[frame])
            masks[obj][frame] = encode_mask(mask > 0)
    record = VideoRecord(
        video_dir.name, list(paths), jpegs, annotated, masks, size, FPS, split, source="sa-v"
    )
    return [encode_video(clip) for clip in record.clips(clip_len)]


def manifest_video_samples(manifest: Path, root: Path, split: str, clip_len: int) -> list[Sample]:
    """One video of the manifest layout: RLE masklets in JSON, frames as extracted JPEGs."""
    try:
        meta = json.loads(manifest.read_text())
        video_id = meta["video_id"]
        masklet, masklet_ids = meta["masklet"], [int(k) for k in meta["masklet_id"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{manifest}: not an SA-V manifest ({exc!r}); expected video_id, masklet, masklet_id"
        ) from None
    frame_dir = root / FRAMES_DIR / video_id
    paths, jpegs, size = read_frames(frame_dir)
    annotated = [ANNOTATE_EVERY * i for i in range(len(masklet))]
    masks: dict[int, dict] = {obj: {} for obj in masklet_ids}
    for frame, per_object in zip(annotated, masklet, strict=True):
        if frame not in paths:
            raise DataError(
                f"{manifest}: masklet entry for frame {frame} has no {frame_dir / f'{frame:05d}.jpg'}"
            )
        if len(per_object) != len(masklet_ids):
            raise DataError(
                f"{manifest}: frame {frame} has {len(per_object)} masks for {len(masklet_ids)} masklet ids; "
                "each annotated frame needs one mask per object"
            )
        for obj, rle in zip(masklet_ids, per_object, strict=True):
            if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
                raise DataError(f"{manifest}: object {obj} frame {frame} is not a COCO RLE mask")
            if tuple(rle["size"]) != size:
                raise DataError(
                    f"{manifest}: object {obj} frame {frame} mask is {rle['size'][0]}x{rle['size'][1]} "
                    f"but frame {paths[frame]} is {size[0]}x{size[1]}; masks must have their frame's size"
                )
            counts = rle["counts"]
            masks[obj][frame] = {
                "size": list(size),
                "counts": counts if isinstance(counts, str) else counts.decode(),
            }
    record = VideoRecord(
        video_id,
        list(paths),
        jpegs,
        annotated,
        masks,
        size,
        FPS,
        meta.get("video_split") or split,
        source="sa-v",
    )
    return [encode_video(clip) for clip in record.clips(clip_len)]


def convert_sav(
    root: str | Path,
    out_dir: str | Path,
    split: str = "val",
    clip_len: int = 0,
    manifests: str | Path | None = None,
    shard_size: int = 4,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
) -> BuildReport:
    """Shards out/sav-%06d.tar, `shard_size` videos each (one sample per clip of `clip_len` frames; whole
    videos when 0). Manifests are looked for in `manifests` (default: root); *_auto.json ones are left out."""
    root, out = Path(root), Path(out_dir)
    manifest_dir = Path(manifests) if manifests is not None else root
    if not (root / FRAMES_DIR).is_dir():
        raise DataError(f"{root}: unknown layout: SA-V needs {FRAMES_DIR}/<video>/<frame>.jpg under the root")
    if (root / MASKS_DIR).is_dir():
        items = sorted(p for p in (root / MASKS_DIR).iterdir() if p.is_dir())
        make = partial(png_video_samples, root=root, split=split, clip_len=clip_len)
    else:
        items = sorted(p for p in manifest_dir.glob(MANIFEST_GLOB) if not p.stem.endswith("_auto"))
        make = partial(manifest_video_samples, root=root, split=split, clip_len=clip_len)
        if not items:
            raise DataError(
                f"{root}: unknown layout: SA-V needs {MASKS_DIR}/<video>/<obj>/<frame>.png or "
                f"{MANIFEST_GLOB} manifests in {manifest_dir}"
            )
    settings = dict(source="sa-v", root=root.resolve(), manifests=manifest_dir.resolve(), split=split)
    claim_output(out, dict(settings, clip_len=clip_len, shard_size=shard_size))
    tasks = chunk_tasks(out, "sav", items, shard_size, make)
    return build_shards(tasks, workers, skip_bad, progress, desc="sa-v")
