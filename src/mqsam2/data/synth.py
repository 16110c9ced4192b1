"""SA-V-like synthetic clips and COCO-like images with exact masks, so demos and tests need no downloads.

A scene is a textured, slowly panning background and a few textured shapes (ellipses, polygons, stars, blobs)
that move, rotate and scale, pass in front of each other, and (one per clip) leave the frame and come back.
Pixels and masks come from the same geometry: pixel (row i, column j) sits at (x, y) = (j, i) and belongs to
the front-most shape whose outline contains it, so object masks are disjoint and each is what is visible.
Everything is drawn from `numpy.random.default_rng(seed)`: the same seed gives the same pixels.
"""

from __future__ import annotations

import fcntl
import io
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from mqsam2.data.build import BuildReport, build_shards, chunk_tasks, claim_output
from mqsam2.data.format import (
    ImageRecord,
    Sample,
    VideoRecord,
    encode_image,
    encode_mask,
    encode_video,
)

CATEGORIES = {1: "ellipse", 2: "polygon", 3: "star", 4: "blob"}
FPS = 24.0
JPEG_QUALITY = 92
TEXTURE_SIZE = 128
MAX_REACH = 1.25 * 1.5  # breathing (x1.25) times the largest outline radius (blobs stay under 1.5)

Size = int | tuple[int, int]


@dataclass(frozen=True)
class Shape:
    """An outline in the object's own frame: (u, v) is inside when hypot(u, v/aspect) <= radius(angle)."""

    category_id: int
    aspect: float
    sides: int = 0
    depth: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def radius(self, phi: np.ndarray) -> np.ndarray:
        name = CATEGORIES[self.category_id]
        if name == "polygon":
            sector = 2 * math.pi / self.sides
            return math.cos(sector / 2) / np.cos(np.mod(phi, sector) - sector / 2)
        if name == "star":
            return 1 - self.depth * (1 - np.cos(self.sides * phi)) / 2
        if name == "blob":
            return 1 + sum(a * np.cos(k * phi + p) for k, a, p in self.harmonics)
        return np.ones_like(phi)

    @property
    def max_radius(self) -> float:
        return 1 + sum(a for _, a, _ in self.harmonics)


@dataclass(frozen=True)
class SceneObject:
    obj_id: int
    shape: Shape
    texture: np.ndarray  # [K, K, 3] uint8, pinned to the shape so it moves, turns and scales with it
    center: np.ndarray  # [T, 2] (x, y) in pixels
    angle: np.ndarray  # [T] radians from the x axis toward the y axis (clockwise on screen: y points down)
    scale: np.ndarray  # [T] pixels per unit of the shape's frame

    def footprint(
        self, t: int, height: int, width: int
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """(region, inside, colours): the bounding box in the frame, the outline test, the texture there."""
        reach = self.scale[t] * self.shape.max_radius + 1
        cx, cy = self.center[t]
        x0, x1 = max(0, math.floor(cx - reach)), min(width, math.ceil(cx + reach) + 1)
        y0, y1 = max(0, math.floor(cy - reach)), min(height, math.ceil(cy + reach) + 1)
        region = (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))
        dy, dx = np.mgrid[y0 : max(y0, y1), x0 : max(x0, x1)].astype(np.float64)
        dx -= cx
        dy -= cy
        cos, sin = math.cos(self.angle[t]), math.sin(self.angle[t])
        u = (cos * dx + sin * dy) / self.scale[t]
        v = (-sin * dx + cos * dy) / self.scale[t]
        inside = np.hypot(u, v / self.shape.aspect) <= self.shape.radius(np.arctan2(v / self.shape.aspect, u))
        k = self.texture.shape[0]
        to_texel = k / (2 * self.shape.max_radius)
        iu = np.clip(((u + self.shape.max_radius) * to_texel).astype(int), 0, k - 1)
        iv = np.clip(((v + self.shape.max_radius) * to_texel).astype(int), 0, k - 1)
        return region, inside, self.texture[iv, iu]


@dataclass(frozen=True)
class Scene:
    height: int
    width: int
    backdrop: np.ndarray  # [H + 2m, W + 2m, 3] uint8, larger than the frame so the camera can pan
    pan: np.ndarray  # [T, 2] integer (dy, dx) offsets of the frame inside the backdrop
    objects: tuple[SceneObject, ...]  # back to front

    @property
    def num_frames(self) -> int:
        return len(self.pan)

    def background(self, t: int) -> np.ndarray:
        dy, dx = self.pan[t]
        return self.backdrop[dy : dy + self.height, dx : dx + self.width]


DEFAULT_OBJECTS = (2, 5)  # objects per clip, fewest and most


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _count(rng: np.random.Generator, count: int | tuple[int, int]) -> int:
    return count if isinstance(count, int) else int(rng.integers(count[0], count[1] + 1))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """[H, W, 3] float in [0, 1]: random colours on a coarse grid, bicubically interpolated."""
    coarse = rng.random((3, cells, cells)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(c).resize((width, height), Image.BICUBIC)) for c in coarse]
    return np.clip(np.stack(channels, axis=-1), 0, 1)


def _texture(rng: np.random.Generator, height: int, width: int, detail: float) -> np.ndarray:
    """Two colours mixed by stripes, checks or blotches, plus grain: structure for features to track."""
    colours = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    pattern = rng.integers(3)
    freq = rng.uniform(3, 9) * detail
    if pattern == 0:
        beta = rng.uniform(0, math.pi)
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (x * math.cos(beta) + y * math.sin(beta)))
    elif pattern == 1:
        mix = (np.sin(2 * math.pi * freq * x) * np.sin(2 * math.pi * freq * y) > 0).astype(np.float32)
    else:
        mix = _smooth_noise(rng, height, width, int(rng.integers(3, 7)))[..., 0]
    image = colours[0] * (1 - mix[..., None]) + colours[1] * mix[..., None]
    image = 0.75 * image + 0.25 * 255 * _smooth_noise(rng, height, width, 5)
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape(rng: np.random.Generator) -> Shape:
    category = int(rng.integers(1, len(CATEGORIES) + 1))
    name = CATEGORIES[category]
    if name == "ellipse":
        return Shape(category, aspect=float(rng.uniform(0.45, 0.95)))
    if name == "polygon":
        return Shape(category, aspect=float(rng.uniform(0.6, 1.0)), sides=int(rng.integers(3, 7)))
    if name == "star":
        return Shape(category, 1.0, sides=int(rng.integers(4, 8)), depth=float(rng.uniform(0.3, 0.55)))
    harmonics = tuple(
        (k, float(rng.uniform(0.03, 0.12)), float(rng.uniform(0, 2 * math.pi))) for k in range(2, 6)
    )
    return Shape(category, aspect=float(rng.uniform(0.7, 1.0)), harmonics=harmonics)


def _object(
    rng: np.random.Generator,
    obj_id: int,
    center: np.ndarray,
    scale0: float,
    num_frames: int,
) -> SceneObject:
    t = np.arange(num_frames)
    spin = rng.uniform(0.02, 0.1) * rng.choice([-1, 1])
    breathe = rng.uniform(0.05, 0.2)
    texture = _texture(rng, TEXTURE_SIZE, TEXTURE_SIZE, detail=1.0)
    angle = rng.uniform(0, 2 * math.pi) + spin * t
    scale = scale0 * (1 + 0.25 * np.sin(breathe * t + rng.uniform(0, 2 * math.pi)))
    return SceneObject(obj_id, _shape(rng), texture, center, angle, scale)


def _distance_to_border(start: np.ndarray, heading: np.ndarray, width: int, height: int) -> float:
    """How far a point at `start` inside the frame travels along the unit vector `heading` to the border."""
    return min(
        ((extent if step > 0 else 0) - position) / step
        for position, step, extent in zip(start, heading, (width, height), strict=True)
        if abs(step) > 1e-9
    )


def make_scene(
    seed: int, num_frames: int, size: Size, num_objects: int | tuple[int, int] = DEFAULT_OBJECTS
) -> Scene:
    """A clip's geometry: objects start spread on a ring, orbit and cross the centre (so they occlude each
    other), and one heads for the nearest edge, is fully outside for the middle half and comes back."""
    rng = np.random.default_rng(seed)
    height, width = _hw(size)
    short = min(height, width)
    count = _count(rng, num_objects)
    margin = max(4, round(0.05 * max(height, width)))
    backdrop = _texture(rng, height + 2 * margin, width + 2 * margin, detail=2.5)
    t = np.arange(num_frames)
    phase = rng.uniform(0, 2 * math.pi, size=2)
    pan = np.stack([np.sin(0.04 * t + phase[0]), np.sin(0.03 * t + phase[1])], axis=1)
    pan = np.rint(margin * (1 + pan)).astype(int)
    middle = np.array([width / 2, height / 2])
    ring = 0.28 * short
    wanderer = int(rng.integers(count))
    objects = []
    for index in range(count):
        start_angle = 2 * math.pi * index / count + rng.uniform(-0.3, 0.3)
        scale0 = rng.uniform(0.09, 0.15) * short
        if index == wanderer:
            start = middle + ring * np.array([math.cos(start_angle), math.sin(start_angle)])
            heading = (start - middle) / np.linalg.norm(start - middle)
            travel = 2 * (_distance_to_border(start, heading, width, height) + MAX_REACH * scale0 + 2)
            along = (1 - np.cos(2 * math.pi * t / max(num_frames - 1, 1))) / 2
            center = start + travel * along[:, None] * heading
        else:
            orbit = start_angle + rng.uniform(0.03, 0.1) * rng.choice([-1, 1]) * t
            swing = np.cos(rng.uniform(0.05, 0.15) * t)
            radius = ring * (0.3 + 0.7 * swing)
            center = middle + radius[:, None] * np.stack([np.cos(orbit), np.sin(orbit)], axis=1)
        objects.append(_object(rng, index + 1, center, scale0, num_frames))
    order = rng.permutation(count)
    return Scene(height, width, backdrop, pan, tuple(objects[i] for i in order))


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(frames [T, H, W, 3] uint8, labels [T, H, W] uint8: the visible object's id, 0 for background)."""
    frames = np.empty((scene.num_frames, scene.height, scene.width, 3), np.uint8)
    labels = np.zeros((scene.num_frames, scene.height, scene.width), np.uint8)
    for t in range(scene.num_frames):
        frames[t] = scene.background(t)
        for obj in scene.objects:
            region, inside, colours = obj.footprint(t, scene.height, scene.width)
            frames[t][region][inside] = colours[inside]
            labels[t][region][inside] = obj.obj_id
    return frames, labels


def render_clip(
    seed: int, num_frames: int, size: Size, num_objects: int | tuple[int, int] = DEFAULT_OBJECTS
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(frames [T, H, W, 3] uint8, {obj_id: visible mask [T, H, W] bool}); ids start at 1."""
    scene = make_scene(seed, num_frames, size, num_objects)
    frames, labels = render_scene(scene)
    return frames, {obj.obj_id: labels == obj.obj_id for obj in sorted(scene.objects, key=lambda o: o.obj_id)}


def make_image_scene(seed: int, size: Size, num_objects: int | tuple[int, int] = (3, 8)) -> Scene:
    """A still: shapes of varied size scattered anywhere (they may overlap and be cut by the border)."""
    rng = np.random.default_rng(seed)
    height, width = _hw(size)
    short = min(height, width)
    backdrop = _texture(rng, height, width, detail=2.5)
    objects = []
    for index in range(_count(rng, num_objects)):
        center = np.array([[rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height]])
        objects.append(_object(rng, index + 1, center, rng.uniform(0.05, 0.2) * short, 1))
    return Scene(height, width, backdrop, np.zeros((1, 2), int), tuple(objects))


def render_image(
    seed: int, size: Size, num_objects: int | tuple[int, int] = (3, 8)
) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, int]]:
    """(image [H, W, 3] uint8, {obj_id: visible mask [H, W] bool}, {obj_id: category id}); objects hidden
    entirely behind others are left out, as COCO has no annotation for what cannot be seen."""
    scene = make_image_scene(seed, size, num_objects)
    frames, labels = render_scene(scene)
    masks = {o.obj_id: labels[0] == o.obj_id for o in sorted(scene.objects, key=lambda o: o.obj_id)}
    categories = {o.obj_id: o.shape.category_id for o in scene.objects}
    visible = {k: m for k, m in masks.items() if m.any()}
    return frames[0], visible, {k: categories[k] for k in visible}


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _item_seed(seed: int, stream: int, index: int) -> int:
    """Independent seeds for the i-th video (stream 0) or image (stream 1) of a synthetic set."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def box_xywh(mask: np.ndarray) -> list[float]:
    """COCO box of a mask: left, top, width, height in pixels, covering whole pixels."""
    rows, cols = np.nonzero(mask)
    return [
        float(cols.min()),
        float(rows.min()),
        float(cols.max() - cols.min() + 1),
        float(rows.max() - rows.min() + 1),
    ]


def _video_samples(
    index: int, seed: int, frames: int, size: Size, num_objects: int | tuple[int, int], annotate_every: int
) -> list[Sample]:
    pixels, masks = render_clip(_item_seed(seed, 0, index), frames, size, num_objects)
    annotated = list(range(0, frames, annotate_every))
    record = VideoRecord(
        video_id=f"synth-s{seed}-v{index:06d}",
        frame_indices=list(range(frames)),
        jpegs=[_jpeg(p) for p in pixels],
        annotated=annotated,
        masks={obj: {t: encode_mask(m[t]) for t in annotated} for obj, m in masks.items()},
        orig_size=pixels.shape[1:3],
        fps=FPS,
        split="synth",
        source="synth",
    )
    return [encode_video(record)]


def _image_samples(index: int, seed: int, size: Size, num_objects: int | tuple[int, int]) -> list[Sample]:
    pixels, masks, categories = render_image(_item_seed(seed, 1, index), size, num_objects)
    annotations = [
        {
            "id": (index + 1) * 1000 + obj,  # unique across the set, as COCO evaluation needs
            "category_id": categories[obj],
            "category": CATEGORIES[categories[obj]],
            "bbox": box_xywh(mask),
            "area": float(mask.sum()),
            "iscrowd": 0,
            "segmentation": encode_mask(mask),
        }
        for obj, mask in masks.items()
    ]
    record = ImageRecord(
        image_id=index + 1,
        jpeg=_jpeg(pixels),
        orig_size=pixels.shape[:2],
        annotations=annotations,
        file_name=f"synth-s{seed}-i{index:06d}.jpg",
        split="synth",
        source="synth",
    )
    return [encode_image(record)]


@dataclass(frozen=True)
class SynthShards:
    """Shard paths of a synthetic set, and what building them did (empty reports: nothing was built)."""

    videos: list[str]
    images: list[str]
    reports: list[BuildReport] = field(default_factory=list, compare=False, repr=False)


def write_synth(
    out_dir: str | Path,
    videos: int,
    frames: int,
    size: Size,
    seed: int = 0,
    images: int = 32,
    image_size: Size | None = None,
    num_objects: int | tuple[int, int] = DEFAULT_OBJECTS,
    annotate_every: int = 1,
    shard_size: int = 2,
    image_shard_size: int = 8,
    workers: int = 1,
    progress: bool = False,
) -> SynthShards:
    """Video shards in out/videos/synth-%06d.tar and image shards in out/images/synth-%06d.tar; shards
    already there are kept (resumable)."""
    out = Path(out_dir)
    image_size = size if image_size is None else image_size
    settings = dict(
        videos=videos,
        frames=frames,
        size=_hw(size),
        seed=seed,
        images=images,
        image_size=_hw(image_size),
        num_objects=num_objects,
        annotate_every=annotate_every,
        shard_size=shard_size,
        image_shard_size=image_shard_size,
    )
    claim_output(out, settings)
    video_tasks = chunk_tasks(
        out / "videos",
        "synth",
        range(videos),
        shard_size,
        partial(
            _video_samples,
            seed=seed,
            frames=frames,
            size=size,
            num_objects=num_objects,
            annotate_every=annotate_every,
        ),
    )
    image_tasks = chunk_tasks(
        out / "images",
        "synth",
        range(images),
        image_shard_size,
        partial(_image_samples, seed=seed, size=image_size, num_objects=(3, 8)),
    )
    reports = [
        build_shards(video_tasks, workers, progress=progress, desc="synth videos"),
        build_shards(image_tasks, workers, progress=progress, desc="synth images"),
    ]
    return SynthShards([str(p) for p in reports[0].shards], [str(p) for p in reports[1].shards], reports)


def ensure_synth(
    root: str | Path = "data/synth",
    videos: int = 8,
    frames: int = 24,
    size: int = 256,
    seed: int = 0,
    images: int = 32,
    num_objects: tuple[int, int] = DEFAULT_OBJECTS,
    workers: int = 1,
) -> SynthShards:
    """The embedded default data set, made on first use under root/<settings>/ (by `workers` processes) and
    reused afterwards. Callers running at once (DDP ranks, parallel tests) take turns on a lock: the first
    makes it."""
    num_objects = (int(num_objects[0]), int(num_objects[1]))
    objects = "" if num_objects == DEFAULT_OBJECTS else f"-o{num_objects[0]}-{num_objects[1]}"
    out = Path(root) / f"v{videos}x{frames}-s{size}-i{images}-seed{seed}{objects}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return write_synth(
            out, videos, frames, size, seed, images=images, num_objects=num_objects, workers=workers
        )
