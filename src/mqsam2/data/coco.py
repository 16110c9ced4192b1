"""COCO instances (an images folder and an instances_*.json) to shards: one sample per image, every
segmentation (polygons, uncompressed or compressed RLE) stored as compressed RLE."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from mqsam2.data.build import BuildReport, build_shards, chunk_tasks, claim_output
from mqsam2.data.files import read_jpeg
from mqsam2.data.format import RLE, DataError, ImageRecord, Sample, encode_image


def to_rle(segmentation: Any, height: int, width: int, where: str) -> RLE:
    """Any COCO segmentation as compressed RLE with text counts."""
    try:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = segmentation
        else:
            raise TypeError(type(segmentation).__name__)
    except (TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{where}: unreadable segmentation ({exc}); fix or remove the annotation") from None
    if tuple(rle["size"]) != (height, width):
        raise DataError(
            f"{where}: mask is {rle['size'][0]}x{rle['size'][1]} but the image is {height}x{width}; "
            "masks must have their image's size"
        )
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts if isinstance(counts, str) else counts.decode("ascii")}


def image_samples(
    item: tuple[dict[str, Any], list[dict[str, Any]]],
    images_dir: Path,
    annotations_file: Path,
    categories: dict[int, str],
    split: str,
) -> list[Sample]:
    image, anns = item
    path = images_dir / image["file_name"]
    jpeg, size = read_jpeg(path)
    if size != (image["height"], image["width"]):
        raise DataError(
            f"{path}: image is {size[0]}x{size[1]} but {annotations_file} says "
            f"{image['height']}x{image['width']}; use the images that go with this annotation file"
        )
    annotations = []
    for ann in anns:
        where = f"{annotations_file} annotation {ann.get('id')} (image {image['id']})"
        if ann.get("category_id") not in categories:
            raise DataError(f"{where}: category {ann.get('category_id')} is not in the file's categories")
        annotations.append(
            {
                "id": ann["id"],
                "category_id": ann["category_id"],
                "category": categories[ann["category_id"]],
                "bbox": [float(v) for v in ann["bbox"]],
                "area": float(ann.get("area", 0.0)),
                "iscrowd": int(ann.get("iscrowd", 0)),
                "segmentation": to_rle(ann["segmentation"], size[0], size[1], where),
            }
        )
    record = ImageRecord(image["id"], jpeg, size, annotations, image["file_name"], split, source="coco")
    return [encode_image(record)]


def split_name(annotations_file: Path) -> str:
    """instances_val2017.json -> val2017."""
    return annotations_file.stem.removeprefix("instances_")


def convert_coco(
    images_dir: str | Path,
    annotations_file: str | Path,
    out_dir: str | Path,
    split: str | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
) -> BuildReport:
    """Shards out/coco-%06d.tar of `shard_size` images each, in image-id order."""
    images_dir, annotations_file, out = Path(images_dir), Path(annotations_file), Path(out_dir)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: no such images folder")
    if not annotations_file.is_file():
        raise DataError(f"{annotations_file}: no such annotations file; give the instances_*.json path")
    try:
        data = json.loads(annotations_file.read_text())
        images, anns, cats = data["images"], data["annotations"], data["categories"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{annotations_file}: unknown layout: not a COCO instances file ({exc!r}); "
            "expected images, annotations and categories"
        ) from None
    split = split or split_name(annotations_file)
    by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in images}
    for ann in anns:
        if ann.get("image_id") not in by_image:
            raise DataError(
                f"{annotations_file}: annotation {ann.get('id')} refers to unknown image "
                f"{ann.get('image_id')}"
            )
        by_image[ann["image_id"]].append(ann)
    items = [(image, by_image[image["id"]]) for image in sorted(images, key=lambda image: image["id"])]
    settings = dict(source="coco", images=images_dir.resolve(), annotations=annotations_file.resolve())
    claim_output(out, dict(settings, split=split, shard_size=shard_size))
    categories = {c["id"]: c["name"] for c in cats}
    make = partial(
        image_samples,
        images_dir=images_dir,
        annotations_file=annotations_file,
        categories=categories,
        split=split,
    )
    return build_shards(
        chunk_tasks(out, "coco", items, shard_size, make), workers, skip_bad, progress, "coco"
    )
