"""From shards to model inputs: webdataset pipelines split over ranks and workers, and the calibration set.

Frames are prepared exactly as sam2's own video loader does (RGB, resized to SxS ignoring the aspect ratio,
/255, ImageNet mean/std) so quantized and float models see identical inputs; masks stay at the stored size.
"""

from __future__ import annotations

import glob
import io
import logging
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import IterableDataset

from mqsam2.data.format import (
    RLE,
    DataError,
    ImageRecord,
    Sample,
    VideoRecord,
    decode_image,
    decode_video,
    describe,
    read_shard,
)

log = logging.getLogger("mqsam2.data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalisation_table() -> np.ndarray:
    """[3, 256]: sam2's torch arithmetic for every byte value, (float32(v / 255) - mean) / std in float32."""
    values = (torch.arange(256, dtype=torch.float64) / 255.0).float()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None]
    return ((values[None] - mean) / std).numpy()


NORMALISED_BYTES = _normalisation_table()


@dataclass
class VideoClip:
    """A clip ready for SAM2: `frames` at model size, `masks` at stored size (zero where not annotated)."""

    video_id: str
    frames: Tensor  # [T, 3, S, S] float32, normalised
    masks: Tensor  # [O, T, H, W] bool
    obj_ids: list[int]
    frame_indices: list[int]
    annotated: Tensor  # [T] bool
    orig_size: tuple[int, int]
    fps: float
    split: str


@dataclass
class ImageSample:
    image_id: int
    image: Tensor  # [3, S, S] float32, normalised
    boxes: Tensor  # [N, 4] float32, xyxy in original pixels
    masks: Tensor  # [N, H, W] bool
    category_ids: list[int]
    orig_size: tuple[int, int]


@dataclass
class ClipBatch:
    """Clips of different lengths: `frames` zero-padded to the longest; each clip's own `frames` is a view
    of its rows (no copy), and its masks keep their own object count and size."""

    frames: Tensor  # [B, T_max, 3, S, S]
    lengths: Tensor  # [B] int64
    clips: list[VideoClip]

    @property
    def valid(self) -> Tensor:
        """[B, T_max] bool: True on real frames, False on padding."""
        return torch.arange(self.frames.shape[1]) < self.lengths[:, None]


@dataclass
class ImageBatch:
    images: Tensor  # [B, 3, S, S]
    samples: list[ImageSample]


@dataclass
class CalibrationSet:
    videos: Sequence[VideoClip]  # a list, or a LazySamples that decodes on access
    images: Sequence[ImageSample]


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from any mix of folders of .tar files, globs (data/sav-*.tar), brace patterns
    (data/x-{000000..000007}.tar) and plain paths or URLs, alone or in a list; a folder or pattern that
    matches no shard is an error naming it."""
    items = [urls] if isinstance(urls, (str, Path)) else list(urls)
    expanded = [
        shard
        for item in items
        for url in wds.shardlists.expand_urls(str(item))  # brace patterns (and "::"-joined lists)
        for shard in _expand_local(url)
    ]
    if not expanded:
        raise DataError("no shard URLs given")
    return expanded


def _expand_local(url: str) -> list[str]:
    """A local folder becomes its .tar files and a glob its matches (folders among them expanded too);
    anything else (a file, a remote URL, a `pipe:` command) is a shard URL as it is."""
    if "://" in url or url.startswith("pipe:"):
        return [url]
    if Path(url).is_dir():
        found = sorted(str(p) for p in Path(url).glob("*.tar"))
        if not found:
            raise DataError(
                f"{url}: no .tar shards in this folder; point data.*_shards at the shards' folder"
            )
        return found
    if glob.has_magic(url):
        matches = sorted(glob.glob(url, recursive=True))
        if not matches:
            raise DataError(f"{url}: no file matches this pattern; check the path")
        return [shard for match in matches for shard in _expand_local(match)]
    return [url]


def normalise(rgb: np.ndarray, out: Tensor | None = None) -> Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 (written into `out` when given), bit-identical to sam2's
    /255 then mean/std: a table lookup of what that arithmetic gives for each byte value."""
    out = torch.empty((3, *rgb.shape[:2]), dtype=torch.float32) if out is None else out
    planes = out.numpy()
    for c in range(3):
        np.take(NORMALISED_BYTES[c], rgb[..., c], out=planes[c], mode="clip")  # "clip": unbuffered
    return out


def load_frame(
    jpeg: bytes, image_size: int, orig_size: tuple[int, int], where: str, out: Tensor | None = None
) -> Tensor:
    """sam2's frame preparation (RGB, resize to SxS, normalise); conversions that would not change the
    pixels (already RGB, already SxS) are skipped."""
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            if (image.height, image.width) != tuple(orig_size):
                raise DataError(
                    f"{where}: frame is {image.height}x{image.width} but its masks are "
                    f"{orig_size[0]}x{orig_size[1]}; rebuild the shard"
                )
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size))
            pixels = np.asarray(rgb)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: unreadable JPEG ({exc}); rebuild the shard") from None
    return normalise(pixels, out)


def decode_masks(rles: list[RLE]) -> Tensor:
    """[N, H, W] bool view of pycocotools' column-major decode (no copy)."""
    return torch.from_numpy(mask_utils.decode(rles).view(np.bool_)).permute(2, 0, 1)


def clip_window(record: VideoRecord, clip_len: int | None, rng: random.Random) -> range:
    """Positions of `clip_len` consecutive frames, starting on an annotated frame when one fits (so the
    first frame can be prompted); the whole clip when clip_len is None or not shorter than it."""
    total = len(record.frame_indices)
    if clip_len is None or clip_len >= total:
        return range(total)
    annotated = set(record.annotated)
    starts = [p for p, f in enumerate(record.frame_indices[: total - clip_len + 1]) if f in annotated]
    start = rng.choice(starts or range(total - clip_len + 1))
    return range(start, start + clip_len)


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Uninitialised; inside a DataLoader worker it is born in shared memory, so handing it to the main
    process costs no copy (as torch's own default_collate arranges)."""
    tensor = torch.empty(shape, dtype=dtype)
    return tensor.share_memory_() if torch.utils.data.get_worker_info() is not None else tensor


def to_clip(record: VideoRecord, positions: range, image_size: int, where: str) -> VideoClip:
    frame_indices = [record.frame_indices[p] for p in positions]
    frames = _new_tensor((len(positions), 3, image_size, image_size), torch.float32)
    for t, p in enumerate(positions):
        load_frame(record.jpegs[p], image_size, record.orig_size, where, out=frames[t])
    labelled_frames = set(record.annotated)
    annotated = torch.tensor([f in labelled_frames for f in frame_indices], dtype=torch.bool)
    labelled = [t for t, f in enumerate(frame_indices) if f in labelled_frames]
    masks = _new_tensor((len(record.obj_ids), len(positions), *record.orig_size), torch.bool).zero_()
    for o, obj in enumerate(record.obj_ids):
        if labelled:
            masks[o, labelled] = decode_masks([record.masks[obj][frame_indices[t]] for t in labelled])
    return VideoClip(
        record.video_id,
        frames,
        masks,
        record.obj_ids,
        frame_indices,
        annotated,
        record.orig_size,
        record.fps,
        record.split,
    )


def to_image_sample(
    record: ImageRecord, image_size: int, where: str, include_crowd: bool = False
) -> ImageSample:
    anns = [a for a in record.annotations if include_crowd or not a.get("iscrowd", 0)]
    height, width = record.orig_size
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    if anns:
        masks = decode_masks([a["segmentation"] for a in anns]).contiguous()
    else:
        masks = torch.zeros((0, height, width), dtype=torch.bool)
    return ImageSample(
        record.image_id,
        load_frame(record.jpeg, image_size, record.orig_size, where),
        boxes,
        masks,
        [int(a["category_id"]) for a in anns],
        record.orig_size,
    )


def _decode_video_sample(sample: Sample, image_size: int, clip_len: int | None) -> VideoClip:
    record = decode_video(sample)
    positions = clip_window(record, clip_len, random.Random(sample["__seed__"]))
    return to_clip(record, positions, image_size, describe(sample))


def _decode_image_sample(sample: Sample, image_size: int, include_crowd: bool) -> ImageSample:
    return to_image_sample(decode_image(sample), image_size, describe(sample), include_crowd)


def _skip_or_raise(exc: Exception, skip_bad: bool) -> bool:
    if skip_bad and isinstance(exc, DataError):
        log.warning("skipped: %s", exc)
        return True
    raise exc


class ShardStream(IterableDataset):
    """This rank's and this worker's shards (split_by_node, then split_by_worker), read as raw samples: one
    pass, or endless passes in a fresh order each time when resampled. Orders come from a generator seeded
    by (seed, rank, worker, epoch), so a run is reproducible; each sample gets a `__seed__` for its draws."""

    def __init__(
        self, urls: list[str], resampled: bool, shuffle: bool, shuffle_buffer: int, seed: int, skip_bad: bool
    ):
        super().__init__()
        self.urls = urls
        self.resampled = resampled
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.skip_bad = skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """For DataLoader workers that are not persistent; otherwise each new iteration counts as an epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}/{rank}/{worker}/{self.epoch}")
        self.epoch += 1
        share = list(wds.split_by_worker(wds.split_by_node(self.urls)))
        if not share and self.resampled:
            warnings.warn(
                f"{len(self.urls)} shards for {world_size} ranks x {num_workers} workers: rank {rank} "
                f"worker {worker} has none of its own and draws from all; write smaller shards",
                stacklevel=2,
            )
            share = list(self.urls)
        samples = self._passes(share, rng) if self.resampled else self._pass(share, rng)
        if self.shuffle:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            sample["__seed__"] = rng.getrandbits(64)
            yield sample

    def _read(self, url: str) -> Iterator[Sample]:
        try:
            yield from read_shard(url)
        except DataError as exc:
            _skip_or_raise(exc, self.skip_bad)

    def _pass(self, share: list[str], rng: random.Random) -> Iterator[Sample]:
        order = rng.sample(share, len(share)) if self.shuffle else share
        for url in order:
            yield from self._read(url)

    def _passes(self, share: list[str], rng: random.Random) -> Iterator[Sample]:
        while True:
            count = 0
            for sample in self._pass(share, rng):
                count += 1
                yield sample
            if count == 0:
                raise DataError(f"{share[0]} and the rest of this rank's {len(share)} shards hold no samples")


def _rank_share(samples: Iterator[Any], epoch_len: int) -> Iterator[Any]:
    """This worker's part of an epoch of `epoch_len` samples per rank (the workers' parts add up to it)."""
    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    return islice(samples, epoch_len // num_workers + (worker < epoch_len % num_workers))


class SamplePipeline(wds.DataPipeline):
    """A webdataset pipeline whose shard stream can be told the epoch, with a length when epochs have one."""

    def __init__(self, *stages: Any, epoch_len: int | None = None):
        super().__init__(*stages)
        self.epoch_len = epoch_len

    def __len__(self) -> int:
        if self.epoch_len is None:
            raise TypeError("this stream has no length: pass epoch_len (with resampled=True) to give it one")
        return self.epoch_len

    def set_epoch(self, epoch: int) -> None:
        self.pipeline[0].set_epoch(epoch)


def _pipeline(
    urls: str | Path | Sequence[str | Path],
    decode: Callable[[Sample], Any],
    resampled: bool,
    epoch_len: int | None,
    shuffle: bool,
    shuffle_buffer: int,
    seed: int,
    skip_bad: bool,
) -> SamplePipeline:
    if epoch_len is not None and not resampled:
        raise ValueError("epoch_len needs resampled=True (a single pass is as long as this rank's shards)")
    stream = ShardStream(expand_urls(urls), resampled, shuffle, shuffle_buffer, seed, skip_bad)
    pipeline = SamplePipeline(
        stream, wds.map(decode, handler=partial(_skip_or_raise, skip_bad=skip_bad)), epoch_len=epoch_len
    )
    if epoch_len is not None:
        pipeline.append(partial(_rank_share, epoch_len=epoch_len))
    return pipeline


def video_dataset(
    urls: str | Path | Sequence[str | Path],
    image_size: int,
    clip_len: int | None = None,
    resampled: bool = True,
    epoch_len: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 8,
    skip_bad: bool = False,
) -> SamplePipeline:
    """VideoClips from video shards. resampled=True: an endless stream, or exactly `epoch_len` clips per
    rank per epoch, so DDP ranks never wait on each other; resampled=False: one pass over this rank's
    shards (evaluation). `clip_len` cuts a random window, starting on an annotated frame, from longer ones."""
    decode = partial(_decode_video_sample, image_size=image_size, clip_len=clip_len)
    return _pipeline(urls, decode, resampled, epoch_len, shuffle, shuffle_buffer, seed, skip_bad)


def image_dataset(
    urls: str | Path | Sequence[str | Path],
    image_size: int,
    resampled: bool = True,
    epoch_len: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 64,
    include_crowd: bool = False,
    skip_bad: bool = False,
) -> SamplePipeline:
    """ImageSamples from image shards, split and resampled like video_dataset. Crowd annotations are left
    out unless include_crowd (COCO evaluation ignores them)."""
    decode = partial(_decode_image_sample, image_size=image_size, include_crowd=include_crowd)
    return _pipeline(urls, decode, resampled, epoch_len, shuffle, shuffle_buffer, seed, skip_bad)


def collate_clips(clips: Sequence[VideoClip]) -> ClipBatch:
    """A padded batch with lengths: use as a DataLoader's collate_fn for video_dataset. A single clip is
    not copied (the batch is a view of it)."""
    lengths = torch.tensor([len(c.frame_indices) for c in clips], dtype=torch.long)
    if len(clips) == 1:
        return ClipBatch(clips[0].frames[None], lengths, list(clips))
    frames = clips[0].frames.new_zeros((len(clips), int(lengths.max()), *clips[0].frames.shape[1:]))
    for row, clip in enumerate(clips):
        frames[row, : len(clip.frame_indices)] = clip.frames
    views = [replace(c, frames=frames[row, : len(c.frame_indices)]) for row, c in enumerate(clips)]
    return ClipBatch(frames, lengths, views)


def collate_images(samples: Sequence[ImageSample]) -> ImageBatch:
    """Stacked images; boxes and masks stay per sample (their counts and sizes differ)."""
    return ImageBatch(torch.stack([s.image for s in samples]), list(samples))


def _draw(urls: str | Path | Sequence[str | Path] | None, rng: random.Random) -> Iterator[Sample]:
    """Samples in an order fixed by the generator alone: shards shuffled, then samples within each shard.
    One shard's samples are held at a time."""
    shards = sorted(expand_urls(urls)) if urls else []
    for url in rng.sample(shards, len(shards)):
        samples = list(read_shard(url))
        yield from rng.sample(samples, len(samples))


@dataclass(frozen=True)
class SampleRef:
    """Where one selected sample lives (shard and key) and, for a video, which frames: what a lazy set keeps
    instead of decoded tensors."""

    url: str
    key: str
    positions: range | None = None


def _select_videos(
    urls, num_videos: int, frames_per_video: int, seed: int, role: str
) -> Iterator[tuple[VideoRecord, range, Sample]]:
    """`num_videos` distinct videos of at least `frames_per_video` frames, each with its window, one at a time;
    a shortfall is a DataError naming the `data.<role>_*` keys to change."""
    if num_videos <= 0:
        return
    rng = random.Random(f"calibration/videos/{seed}")
    seen = set()
    for sample in _draw(urls, rng):
        record = decode_video(sample)
        if record.video_id in seen or len(record.frame_indices) < frames_per_video:
            continue
        seen.add(record.video_id)
        yield record, clip_window(record, frames_per_video, rng), sample
        if len(seen) == num_videos:
            return
    raise DataError(
        f"asked for {num_videos} videos (of at least {frames_per_video} frames), shards hold "
        f"{len(seen)}: lower data.{role}_videos or data.{role}_frames, or add shards"
    )


def _select_images(urls, num_images: int, seed: int, role: str) -> Iterator[tuple[ImageRecord, Sample]]:
    """`num_images` images with at least one object, one at a time; a shortfall is a DataError."""
    if num_images <= 0:
        return
    rng = random.Random(f"calibration/images/{seed}")
    found = 0
    for sample in _draw(urls, rng):
        record = decode_image(sample)
        if any(not a.get("iscrowd", 0) for a in record.annotations):
            found += 1
            yield record, sample
            if found == num_images:
                return
    raise DataError(
        f"asked for {num_images} images (with objects), shards hold {found}: "
        f"lower data.{role}_images or add shards"
    )


def calibration_set(
    video_urls: str | Path | Sequence[str | Path] | None,
    image_urls: str | Path | Sequence[str | Path] | None,
    num_videos: int = 8,
    frames_per_video: int = 20,
    num_images: int = 32,
    image_size: int = 1024,
    seed: int = 0,
) -> CalibrationSet:
    """`num_videos` distinct videos x `frames_per_video` consecutive frames and `num_images` images with at
    least one object, decoded. It reads the shards itself (no rank split), so every rank gets the same set
    whatever the world size, and the same seed gives the same set."""
    # counted before decoding, so a shortfall fails fast
    selected = _select_videos(video_urls, num_videos, frames_per_video, seed, "calib")
    videos = [(record, window, describe(sample)) for record, window, sample in selected]
    images = [
        (record, describe(sample)) for record, sample in _select_images(image_urls, num_images, seed, "calib")
    ]
    return CalibrationSet(
        [to_clip(record, window, image_size, where) for record, window, where in videos],
        [to_image_sample(record, image_size, where) for record, where in images],
    )


class LazySamples(Sequence):
    """Selected samples decoded one at a time when indexed, so memory does not grow with the set's length;
    slicing (e.g. a rank's share, `samples[rank::world]`) gives another lazy set."""

    def __init__(self, refs: Sequence[SampleRef], load: Callable[[SampleRef], Any]):
        self.refs, self.load = list(refs), load

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazySamples(self.refs[index], self.load)
        return self.load(self.refs[index])


def _read_sample(ref: SampleRef) -> Sample:
    for sample in read_shard(ref.url):
        if sample["__key__"] == ref.key:
            return sample
    raise DataError(f"{ref.url}: sample {ref.key} is gone; the shards changed while the run was reading them")


def load_video(ref: SampleRef, image_size: int) -> VideoClip:
    sample = _read_sample(ref)
    return to_clip(decode_video(sample), ref.positions, image_size, describe(sample))


def load_image(ref: SampleRef, image_size: int) -> ImageSample:
    sample = _read_sample(ref)
    return to_image_sample(decode_image(sample), image_size, describe(sample))


def validation_set(
    video_urls: str | Path | Sequence[str | Path] | None,
    image_urls: str | Path | Sequence[str | Path] | None,
    num_videos: int,
    frames_per_video: int,
    num_images: int,
    image_size: int,
    seed: int = 0,
) -> CalibrationSet:
    """The same selection as `calibration_set`, kept as references: each clip or image is read from its shard
    and decoded when it is evaluated, then dropped, so a set of any length costs the memory of one item."""
    videos = [
        SampleRef(s["__url__"], s["__key__"], window)
        for _, window, s in _select_videos(video_urls, num_videos, frames_per_video, seed, "val")
    ]
    images = [
        SampleRef(s["__url__"], s["__key__"]) for _, s in _select_images(image_urls, num_images, seed, "val")
    ]
    return CalibrationSet(
        LazySamples(videos, partial(load_video, image_size=image_size)),
        LazySamples(images, partial(load_image, image_size=image_size)),
    )
