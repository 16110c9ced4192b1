import math
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Outline

from mqsam2.data.format import decode_image, read_shard
from mqsam2.data.loaders import image_dataset, video_dataset
from mqsam2.data.synth import (
    CATEGORIES,
    ensure_synth,
    make_scene,
    render_clip,
    render_image,
    render_scene,
    write_synth,
)

HEIGHT, WIDTH = 90, 120


def _pixel_grid():
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    return xs.astype(float), ys.astype(float)


def _footprint(obj, t):
    """Where a shape covers the frame, from textbook geometry (not the renderer's polar test): the ellipse
    equation, or point-in-polygon for the polygon's corners. None for other shapes."""
    xs, ys = _pixel_grid()
    cx, cy = obj.center[t]
    a, s, shape = obj.angle[t], obj.scale[t], obj.shape
    if CATEGORIES[shape.category_id] == "ellipse":
        along = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
        across = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
        return (along / s) ** 2 + (across / (s * shape.aspect)) ** 2 <= 1
    if CATEGORIES[shape.category_id] == "polygon":
        angles = 2 * math.pi * np.arange(shape.sides) / shape.sides  # corners sit at these outline angles
        corners = np.stack([np.cos(angles), shape.aspect * np.sin(angles)], axis=1) * s
        rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        corners = corners @ rotation.T + [cx, cy]
        inside = Outline(corners).contains_points(np.stack([xs.ravel(), ys.ravel()], 1))
        return inside.reshape(HEIGHT, WIDTH)
    return None


def test_masks_are_the_visible_part_of_each_shape():
    checked = {"ellipse": 0, "polygon": 0}
    for seed in range(6):
        scene = make_scene(seed, 6, (HEIGHT, WIDTH), num_objects=4)
        _, labels = render_scene(scene)
        for depth, obj in enumerate(scene.objects):
            for t in range(scene.num_frames):
                footprint = _footprint(obj, t)
                if footprint is None:
                    continue
                covered = np.zeros_like(footprint)
                for front in scene.objects[depth + 1 :]:
                    covered |= labels[t] == front.obj_id
                expected = footprint & ~covered
                assert np.array_equal(labels[t] == obj.obj_id, expected), (seed, obj.obj_id, t)
                checked[CATEGORIES[obj.shape.category_id]] += 1
    assert min(checked.values()) > 10


def test_background_pixels_are_untouched_and_objects_are_drawn():
    scene = make_scene(7, 5, (HEIGHT, WIDTH))
    frames, labels = render_scene(scene)
    for t in range(5):
        background = labels[t] == 0
        assert np.array_equal(frames[t][background], scene.background(t)[background])
        changed = np.any(frames[t] != scene.background(t), axis=-1)
        assert changed[~background].mean() > 0.9


def test_masks_are_disjoint_and_cover_every_object_pixel():
    _, masks = render_clip(11, 8, (HEIGHT, WIDTH))
    stacked = np.stack(list(masks.values()))
    assert stacked.sum(axis=0).max() <= 1
    assert stacked.any(axis=(0,)).sum() > 0


def test_clips_have_occlusions_and_an_object_that_leaves_and_comes_back():
    for seed in range(4):
        scene = make_scene(seed, 24, (HEIGHT, WIDTH))
        _, labels = render_scene(scene)
        area = {o.obj_id: (labels == o.obj_id).sum(axis=(1, 2)) for o in scene.objects}
        returns = [k for k, a in area.items() if a[0] > 0 and a[-1] > 0 and (a[6:18] == 0).any()]
        assert returns, f"seed {seed}: no object leaves and re-enters the frame"
        alone = {
            o.obj_id: (render_scene(replace(scene, objects=(o,)))[1] > 0).sum(axis=(1, 2))
            for o in scene.objects
        }
        hidden = sum(int((alone[k] - area[k]).sum()) for k in area)
        assert hidden > 0, f"seed {seed}: no object is ever in front of another"


def test_same_seed_same_pixels():
    a_frames, a_masks = render_clip(5, 6, 64)
    b_frames, b_masks = render_clip(5, 6, 64)
    assert np.array_equal(a_frames, b_frames)
    assert all(np.array_equal(a_masks[k], b_masks[k]) for k in a_masks)
    assert not np.array_equal(a_frames, render_clip(6, 6, 64)[0])


def test_image_boxes_are_tight_around_their_masks(synth_set):
    for sample in image_dataset(synth_set.images, 32, resampled=False):
        assert len(sample.category_ids) > 0 and set(sample.category_ids) <= set(CATEGORIES)
        for box, mask in zip(sample.boxes, sample.masks, strict=True):
            rows, cols = np.nonzero(mask.numpy())
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_render_image_leaves_out_hidden_objects():
    for seed in range(10):
        _, masks, categories = render_image(seed, 64)
        assert all(m.any() for m in masks.values()) and masks.keys() == categories.keys()


def test_default_sized_set_is_quick_and_complete(tmp_path):
    start = time.perf_counter()
    shards = write_synth(tmp_path, videos=8, frames=24, size=256, seed=0, images=8)
    assert time.perf_counter() - start < 20
    clips = list(video_dataset(shards.videos, 64, resampled=False, shuffle=False))
    assert sorted(c.video_id for c in clips) == [f"synth-s0-v{i:06d}" for i in range(8)]
    assert all(c.frames.shape == (24, 3, 64, 64) and c.masks.shape[1:] == (24, 256, 256) for c in clips)
    assert all(c.annotated.all() for c in clips)


def _ensure(root):
    return ensure_synth(root, videos=3, frames=3, size=32, images=2)


def test_ensure_synth_makes_the_set_once_even_when_called_at_once(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_ensure, [tmp_path, tmp_path])
    assert results[0] == results[1] == _ensure(tmp_path)
    assert _ensure(tmp_path).reports[0].built == 0
    clips = list(video_dataset(results[0].videos, 32, resampled=False))
    assert sorted(c.video_id for c in clips) == ["synth-s0-v000000", "synth-s0-v000001", "synth-s0-v000002"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_image_annotation_ids_are_unique_across_the_set(synth_set):
    ids = [a["id"] for url in synth_set.images for s in read_shard(url) for a in decode_image(s).annotations]
    assert len(ids) == len(set(ids)) > 16


def test_ensure_synth_object_counts_keep_their_own_set(tmp_path):
    """Clips of 1-1 objects (the trained model's regime is 1-3) land in their own folder and hold exactly that."""
    single = ensure_synth(tmp_path, videos=3, frames=2, size=32, images=0, num_objects=(1, 1))
    default = ensure_synth(tmp_path, videos=3, frames=2, size=32, images=0)
    assert {str(p.parent.parent) for p in map(Path, single.videos)}.isdisjoint(
        str(p.parent.parent) for p in map(Path, default.videos)
    )
    counts = [len(c.obj_ids) for c in video_dataset(single.videos, 32, resampled=False, shuffle=False)]
    assert counts == [1, 1, 1]
    assert all(len(c.obj_ids) >= 2 for c in video_dataset(default.videos, 32, resampled=False, shuffle=False))
