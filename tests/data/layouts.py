"""Small data sets in the SA-V, DAVIS and COCO layouts, built in tmp folders from synthetic pictures.

Each builder returns what it wrote (file paths and the masks as arrays), so tests compare the shards with the
fixture files themselves rather than with the converter's own logic.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mqsam2.data.synth import render_clip, render_image

SAV_SIZE = (72, 96)


def jpeg_file(path: Path, pixels: np.ndarray) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@dataclass
class VideoFixture:
    video_id: str
    frames: dict[int, Path]  # frame number -> JPEG
    masks: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # obj -> frame -> bool mask


def build_sav(root: Path, videos: int = 3, frames: int = 9, manifest: bool = False) -> list[VideoFixture]:
    """SA-V val layout (per-object PNGs every 4th frame), or the train layout's sav_*.json manifests."""
    built = []
    for v in range(videos):
        video_id = f"sav_{v + 1:06d}"
        pixels, masks = render_clip(100 + v, frames, SAV_SIZE, num_objects=2)
        fixture = VideoFixture(video_id, {})
        for t in range(frames):
            fixture.frames[t] = root / "JPEGImages_24fps" / video_id / f"{t:05d}.jpg"
            jpeg_file(fixture.frames[t], pixels[t])
        annotated = range(0, frames, 4)
        for k, (_, mask) in enumerate(sorted(masks.items())):
            fixture.masks[k] = {t: mask[t] for t in annotated}
        if manifest:
            masklet = [
                [
                    mask_utils.encode(np.asfortranarray(fixture.masks[k][t].astype(np.uint8)))
                    for k in fixture.masks
                ]
                for t in annotated
            ]
            for per_frame in masklet:
                for rle in per_frame:
                    rle["counts"] = rle["counts"].decode()
            meta = {
                "video_id": video_id,
                "masklet": masklet,
                "masklet_id": sorted(fixture.masks),
                "video_split": "train",
            }
            (root / f"{video_id}_manual.json").write_text(json.dumps(meta))
            (root / f"{video_id}_auto.json").write_text(json.dumps(dict(meta, masklet_id=[7, 8])))
        else:
            for k, per_frame in fixture.masks.items():
                for t, mask in per_frame.items():
                    path = root / "Annotations_6fps" / video_id / f"{k:03d}" / f"{t:05d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        built.append(fixture)
    return built


def build_davis(root: Path, videos: int = 3, frames: int = 5, listed: int = 2) -> list[VideoFixture]:
    """DAVIS 2017 layout: palette PNGs whose indices are object ids; the last frame has no PNG (unannotated);
    ImageSets/2017/val.txt lists the first `listed` videos."""
    built = []
    for v in range(videos):
        name = f"clip-{v}"
        pixels, masks = render_clip(200 + v, frames, (48, 80), num_objects=3)
        fixture = VideoFixture(name, {})
        labels = np.zeros((frames, 48, 80), np.uint8)
        for obj, mask in masks.items():
            labels[mask] = obj
        for t in range(frames):
            fixture.frames[t] = root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
            jpeg_file(fixture.frames[t], pixels[t])
            if t < frames - 1:
                png = Image.frombytes("P", (80, 48), labels[t].tobytes())
                png.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [255] * 756)
                path = root / "Annotations" / "480p" / name / f"{t:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                png.save(path)
        fixture.masks = {obj: {t: labels[t] == obj for t in range(frames - 1)} for obj in masks}
        built.append(fixture)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{f.video_id}\n" for f in built[:listed]))
    return built


def build_coco(root: Path) -> Path:
    """val2017/ with three images and instances_val2017.json mixing polygon, uncompressed-RLE (crowd) and
    compressed-RLE segmentations; image 3 has no annotations."""
    images, annotations = [], []
    for image_id in (1, 2, 3):
        pixels, masks, categories = render_image(300 + image_id, (60, 90))
        name = f"{image_id:012d}.jpg"
        jpeg_file(root / "val2017" / name, pixels)
        images.append({"id": image_id, "file_name": name, "height": 60, "width": 90})
        if image_id == 3:
            continue
        for obj, mask in masks.items():
            ann = {
                "id": 100 * image_id + obj,
                "image_id": image_id,
                "category_id": categories[obj],
                "iscrowd": 0,
            }
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ann["bbox"] = mask_utils.toBbox(rle).tolist()
            ann["area"] = float(mask.sum())
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            annotations.append(ann)
    annotations.append(
        {
            "id": 900,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "bbox": [10.0, 5.0, 30.0, 20.0],
            "area": 300.0,
            "segmentation": [[10.0, 5.0, 40.0, 5.0, 40.0, 25.0, 10.0, 25.0]],
        }
    )
    crowd = np.zeros((60, 90), np.uint8)
    crowd[30:50, 5:25] = 1
    flat = crowd.flatten(order="F")  # uncompressed RLE: run lengths in column-major order, starting with 0s
    edges = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = ([0] if flat[0] else []) + np.diff(edges).tolist()
    annotations.append(
        {
            "id": 901,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [5.0, 30.0, 20.0, 20.0],
            "area": 400.0,
            "segmentation": {"size": [60, 90], "counts": counts},
        }
    )
    categories = [{"id": k, "name": n, "supercategory": "shape"} for k, n in [(1, "ellipse"), (2, "polygon")]]
    categories += [{"id": 3, "name": "star", "supercategory": "shape"}, {"id": 4, "name": "blob"}]
    path = root / "annotations" / "instances_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path
