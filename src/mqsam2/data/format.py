"""The shard schema: how a video clip or an image becomes one WebDataset sample, and back.

A shard is a plain tar that ``webdataset`` reads; every file in it is ``<key>.<field>`` where the key has no
dots. See docs/data.md for the fields. Records here hold what is stored (JPEG bytes, COCO RLE); decoding to
tensors at the model's input size is the loaders' job.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from mqsam2.errors import MQSAM2Error
from mqsam2.files import atomic_output

SCHEMA_VERSION = 1
META_FIELD = "json"
MASKS_FIELD = "masks.json"
IMAGE_FIELD = "jpg"
# a real way out wherever the shard is read: fit's data.*_shards options, or the loaders' shard lists
FIX_SHARD = "rebuild the shard with `python -m mqsam2.data`, or leave it out of data.*_shards"

RLE = dict[str, Any]
Sample = dict[str, Any]


class DataError(MQSAM2Error):
    """Bad input data: the message names the file (or shard and sample) and how to fix it."""


def frame_field(frame_index: int) -> str:
    return f"{frame_index:06d}.jpg"


def sample_key(name: str) -> str:
    """A tar key from any id: webdataset splits a member name at its first dot, so keys must have none."""
    return re.sub(r"[^0-9A-Za-z_-]", "_", name)


def encode_mask(mask: np.ndarray) -> RLE:
    """Compressed COCO RLE with text counts, so it can live in JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: RLE) -> np.ndarray:
    return mask_utils.decode(rle).astype(bool)


def check_jpeg(data: bytes, where: str) -> tuple[int, int]:
    """(height, width) of a JPEG; a truncated or non-JPEG file is a DataError naming `where`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                raise DataError(f"{where}: is {image.format}, not JPEG; convert it to JPEG first")
            if not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
                image.load()  # no end-of-image marker: accept only if it still decodes
            return image.height, image.width
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: unreadable JPEG ({exc}); re-export or remove the file") from None


@dataclass
class VideoRecord:
    """One (video, clip) as stored: original JPEG bytes and COCO RLE masks per object and annotated frame."""

    video_id: str
    frame_indices: list[int]
    jpegs: list[bytes]
    annotated: list[int]
    masks: dict[int, dict[int, RLE]]
    orig_size: tuple[int, int]
    fps: float
    split: str
    clip: int = 0
    source: str = ""

    @property
    def key(self) -> str:
        return f"{sample_key(self.video_id)}-c{self.clip:04d}"

    @property
    def obj_ids(self) -> list[int]:
        return sorted(self.masks)

    def clips(self, clip_len: int) -> list[VideoRecord]:
        """Consecutive clips of at most `clip_len` frames (all frames in one clip when clip_len <= 0)."""
        if clip_len <= 0 or len(self.frame_indices) <= clip_len:
            return [self]
        pieces = []
        for clip, start in enumerate(range(0, len(self.frame_indices), clip_len)):
            frames = self.frame_indices[start : start + clip_len]
            annotated = [f for f in self.annotated if frames[0] <= f <= frames[-1]]
            masks = {obj: {f: per_frame[f] for f in annotated} for obj, per_frame in self.masks.items()}
            pieces.append(
                VideoRecord(
                    self.video_id,
                    frames,
                    self.jpegs[start : start + clip_len],
                    annotated,
                    masks,
                    self.orig_size,
                    self.fps,
                    self.split,
                    clip,
                    self.source,
                )
            )
        return pieces


@dataclass
class ImageRecord:
    """One image as stored: JPEG bytes plus COCO annotations whose segmentation is compressed RLE."""

    image_id: int
    jpeg: bytes
    orig_size: tuple[int, int]
    annotations: list[dict[str, Any]] = field(default_factory=list)
    file_name: str = ""
    split: str = ""
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.image_id:012d}"


def _check_rle(rle: Any, size: tuple[int, int], where: str) -> None:
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise DataError(f"{where}: not a COCO RLE mask; {FIX_SHARD}")
    if tuple(rle["size"]) != tuple(size):
        raise DataError(
            f"{where}: mask is {rle['size'][0]}x{rle['size'][1]} but the frame is {size[0]}x{size[1]}; "
            "masks must have their frame's size"
        )


def encode_video(record: VideoRecord) -> Sample:
    """A webdataset sample (field -> bytes); refuses records whose masks or frames do not line up."""
    where = f"video {record.video_id} clip {record.clip}"
    if len(record.jpegs) != len(record.frame_indices):
        raise DataError(f"{where}: {len(record.jpegs)} frames for {len(record.frame_indices)} frame indices")
    missing = set(record.annotated) - set(record.frame_indices)
    if missing:
        raise DataError(f"{where}: annotated frames {sorted(missing)} have no JPEG; add the frames")
    for obj, per_frame in record.masks.items():
        for frame in record.annotated:
            if frame not in per_frame:
                raise DataError(f"{where}: object {obj} has no mask for annotated frame {frame}")
            _check_rle(per_frame[frame], record.orig_size, f"{where} object {obj} frame {frame}")
    meta = {
        "kind": "video",
        "schema": SCHEMA_VERSION,
        "video_id": record.video_id,
        "clip": record.clip,
        "frame_indices": record.frame_indices,
        "annotated": record.annotated,
        "obj_ids": record.obj_ids,
        "fps": record.fps,
        "orig_size": list(record.orig_size),
        "split": record.split,
        "source": record.source,
    }
    masks = {str(obj): {str(f): record.masks[obj][f] for f in record.annotated} for obj in record.obj_ids}
    sample: Sample = {
        "__key__": record.key,
        META_FIELD: json.dumps(meta).encode(),
        MASKS_FIELD: json.dumps(masks).encode(),
    }
    for frame, jpeg in zip(record.frame_indices, record.jpegs, strict=True):
        sample[frame_field(frame)] = jpeg
    return sample


def encode_image(record: ImageRecord) -> Sample:
    where = f"image {record.image_id}"
    for ann in record.annotations:
        _check_rle(ann.get("segmentation"), record.orig_size, f"{where} annotation {ann.get('id')}")
    meta = {
        "kind": "image",
        "schema": SCHEMA_VERSION,
        "image_id": record.image_id,
        "file_name": record.file_name,
        "orig_size": list(record.orig_size),
        "split": record.split,
        "source": record.source,
        "annotations": record.annotations,
    }
    return {"__key__": record.key, IMAGE_FIELD: record.jpeg, META_FIELD: json.dumps(meta).encode()}


def describe(sample: Sample) -> str:
    """Where a sample comes from, for error messages: its shard and key."""
    return f"{sample.get('__url__', '<memory>')} (sample {sample.get('__key__')})"


def _load_json(sample: Sample, name: str, kind: str | None = None) -> Any:
    if name not in sample:
        raise DataError(f"{describe(sample)}: no {name} field; {FIX_SHARD}")
    try:
        value = json.loads(sample[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{describe(sample)}: {name} is not valid JSON ({exc}); {FIX_SHARD}") from None
    if kind is not None and value.get("kind") != kind:
        raise DataError(
            f"{describe(sample)}: holds a {value.get('kind')!r} sample where a {kind} was expected; "
            "point the loader at the right shards"
        )
    return value


def decode_video(sample: Sample) -> VideoRecord:
    """Parse and check a video sample; JPEGs and RLEs stay encoded so a loader decodes only what it uses."""
    where = describe(sample)
    meta = _load_json(sample, META_FIELD, "video")
    masks = _load_json(sample, MASKS_FIELD)
    size = (int(meta["orig_size"][0]), int(meta["orig_size"][1]))
    jpegs = []
    for frame in meta["frame_indices"]:
        name = frame_field(frame)
        if name not in sample:
            raise DataError(f"{where}: frame {frame} is listed but {name} is missing; {FIX_SHARD}")
        jpegs.append(sample[name])
    per_object: dict[int, dict[int, RLE]] = {}
    for obj in meta["obj_ids"]:
        per_object[obj] = {}
        for frame in meta["annotated"]:
            rle = masks.get(str(obj), {}).get(str(frame))
            if rle is None:
                raise DataError(f"{where}: no mask for object {obj} at annotated frame {frame}; {FIX_SHARD}")
            _check_rle(rle, size, f"{where} object {obj} frame {frame}")
            per_object[obj][frame] = rle
    return VideoRecord(
        video_id=meta["video_id"],
        frame_indices=list(meta["frame_indices"]),
        jpegs=jpegs,
        annotated=list(meta["annotated"]),
        masks=per_object,
        orig_size=size,
        fps=float(meta["fps"]),
        split=meta["split"],
        clip=int(meta["clip"]),
        source=meta.get("source", ""),
    )


def decode_image(sample: Sample) -> ImageRecord:
    meta = _load_json(sample, META_FIELD, "image")
    if IMAGE_FIELD not in sample:
        raise DataError(f"{describe(sample)}: no {IMAGE_FIELD} field; {FIX_SHARD}")
    size = (int(meta["orig_size"][0]), int(meta["orig_size"][1]))
    for ann in meta["annotations"]:
        _check_rle(ann.get("segmentation"), size, f"{describe(sample)} annotation {ann.get('id')}")
    return ImageRecord(
        image_id=int(meta["image_id"]),
        jpeg=sample[IMAGE_FIELD],
        orig_size=size,
        annotations=meta["annotations"],
        file_name=meta.get("file_name", ""),
        split=meta.get("split", ""),
        source=meta.get("source", ""),
    )


class ShardWriter:
    """Writes one shard through `mqsam2.files.atomic_output`: a finished name is a whole shard."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._output = atomic_output(self.path)
        self._tar: wds.TarWriter | None = None

    def __enter__(self) -> ShardWriter:
        self._tar = wds.TarWriter(self._output.__enter__(), encoder=False, mtime=0)
        return self

    def write(self, sample: Sample) -> None:
        assert self._tar is not None, "use ShardWriter as a context manager"
        self._tar.write(sample)

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        assert self._tar is not None
        self._tar.close()
        return self._output.__exit__(exc_type, exc, tb)


class _TailStream:
    """Passes reads through and remembers the last bytes, to tell a finished tar from one cut short."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.total = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def ends_like_a_tar(self) -> bool:
        while self.read(1 << 16):
            pass
        return self.total % 512 == 0 and len(self.tail) == 1024 and not self.tail.strip(b"\0")


def read_shard(url: str) -> Iterator[Sample]:
    """Samples of one shard; a corrupt or truncated tar is a DataError naming it (tar members cut short,
    a bad header, or a missing end-of-archive marker, which is what a cut at a member boundary leaves)."""
    stream = None
    try:
        stream = _TailStream(wds.gopen(url))
        files = wds.tariterators.tar_file_iterator(stream)
        yield from wds.tariterators.group_by_keys(dict(f, __url__=url) for f in files)
        if not stream.ends_like_a_tar():
            raise DataError(f"{url}: truncated shard (no end-of-archive marker); {FIX_SHARD}")
    except FileNotFoundError:
        raise DataError(f"{url}: no such shard; check the path or brace pattern") from None
    except IsADirectoryError:
        raise DataError(
            f"{url}: a folder, not a shard; give it to expand_urls (or the config) to read its .tar files"
        ) from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else None
        reason = reason or (str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__)
        raise DataError(f"{url}: corrupt or truncated shard ({reason}); {FIX_SHARD}") from None
    finally:
        if stream is not None:
            stream.stream.close()
