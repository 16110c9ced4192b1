import io
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.utils.misc import _load_img_as_tensor

from mqsam2.data.format import DataError, ShardWriter, VideoRecord, encode_mask, encode_video, read_shard
from mqsam2.data.loaders import (
    LazySamples,
    SampleRef,
    calibration_set,
    collate_clips,
    expand_urls,
    validation_set,
    video_dataset,
)


def _jpeg(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _tiny_video(name, frames=3, size=(16, 24), mask_size=None):
    rng = np.random.default_rng(len(name))
    pixels = rng.integers(0, 256, size=(frames, *size, 3), dtype=np.uint8)
    mask = np.zeros(mask_size or size, bool)
    mask[2:5, 3:9] = True
    return VideoRecord(
        video_id=name,
        frame_indices=list(range(frames)),
        jpegs=[_jpeg(p) for p in pixels],
        annotated=[0],
        masks={1: {0: encode_mask(mask)}},
        orig_size=mask.shape,
        fps=24.0,
        split="test",
    )


def _uneven_shards(folder, sizes):
    paths = []
    for s, count in enumerate(sizes):
        paths.append(str(folder / f"u-{s:06d}.tar"))
        with ShardWriter(paths[-1]) as writer:
            for v in range(count):
                writer.write(encode_video(_tiny_video(f"s{s}v{v}")))
    return paths


def test_frames_are_prepared_exactly_like_sam2(synth_set, tmp_path):
    clip = next(iter(video_dataset(synth_set.videos[0], 64, resampled=False, shuffle=False)))
    sample = next(s for s in read_shard(synth_set.videos[0]) if s["__key__"].startswith(clip.video_id))
    for t, frame in enumerate(clip.frame_indices):
        path = tmp_path / f"{frame}.jpg"
        path.write_bytes(sample[f"{frame:06d}.jpg"])
        image, height, width = _load_img_as_tensor(str(path), 64)  # sam2's own loader, then its normalisation
        expected = torch.zeros(1, 3, 64, 64, dtype=torch.float32)
        expected[0] = image
        expected -= torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
        expected /= torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
        assert torch.equal(clip.frames[t], expected[0])
        assert (height, width) == clip.orig_size == (72, 96)


def test_two_ranks_two_workers_see_disjoint_samples_covering_every_shard(synth_set, ranks):
    seen = {}
    for rank in range(2):
        for worker in range(2):
            ranks(rank, 2, worker, 2)
            dataset = video_dataset(synth_set.videos, 32, resampled=False, seed=5)
            stream = dataset.pipeline[0]
            seen[rank, worker] = {(s["__url__"], s["__key__"]) for s in stream}
    shards = [{url for url, _ in pairs} for pairs in seen.values()]
    keys = [{key for _, key in pairs} for pairs in seen.values()]
    assert all(len(s) == 1 for s in shards) and set.union(*shards) == set(synth_set.videos)
    assert sum(map(len, keys)) == len(set.union(*keys)) == 8


def test_resampled_epochs_are_equally_long_on_every_rank_with_uneven_shards(tmp_path, ranks):
    shards = _uneven_shards(tmp_path, [1, 4, 2, 1, 5, 1, 3, 2])
    owners = {f"s{s}v{v}": shards[s] for s, n in enumerate([1, 4, 2, 1, 5, 1, 3, 2]) for v in range(n)}
    per_rank = {}
    for rank in range(2):
        per_rank[rank] = []
        for worker in range(2):
            ranks(rank, 2, worker, 2)
            dataset = video_dataset(shards, 16, epoch_len=7, seed=1)
            assert len(dataset) == 7
            clips = [c.video_id for c in dataset]
            mine = set(shards[rank::2][worker::2])
            assert {owners[v] for v in clips} <= mine  # resampling stays inside this rank/worker's shards
            per_rank[rank] += clips
    assert [len(v) for v in per_rank.values()] == [7, 7]


def test_resampled_order_is_reproducible_and_changes_each_epoch(tmp_path, ranks):
    shards = _uneven_shards(tmp_path, [3, 3, 3])
    ranks(0, 1)
    first = video_dataset(shards, 16, epoch_len=9, seed=2)
    epochs = [[c.video_id for c in first] for _ in range(2)]
    again = video_dataset(shards, 16, epoch_len=9, seed=2)
    assert [c.video_id for c in again] == epochs[0]
    assert epochs[0] != epochs[1]
    again.set_epoch(1)
    assert [c.video_id for c in again] == epochs[1]


def test_dataloader_workers_on_two_ranks(synth_set, monkeypatch):
    ids = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = video_dataset(synth_set.videos, 32, resampled=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_clips)
        ids.append({clip.video_id for batch in loader for clip in batch.clips})
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 8


def test_clip_len_cuts_consecutive_windows_from_an_annotated_frame(tmp_path):
    with ShardWriter(tmp_path / "a.tar") as writer:
        writer.write(encode_video(replace(_tiny_video("a", frames=9), annotated=[0, 4], masks={})))
    for seed in range(5):
        [clip] = list(video_dataset(str(tmp_path / "a.tar"), 16, clip_len=4, resampled=False, seed=seed))
        start = clip.frame_indices[0]
        assert clip.frame_indices == list(range(start, start + 4)) and start in (0, 4)
        assert clip.annotated.tolist() == [True, False, False, False]
        assert clip.frames.shape == (4, 3, 16, 16) and clip.masks.shape == (0, 4, 16, 24)


def test_collate_pads_clips_of_different_lengths(synth_set):
    long = next(iter(video_dataset(synth_set.videos, 32, resampled=False)))
    short = replace(
        long,
        frames=long.frames[:5],
        masks=long.masks[:, :5],
        frame_indices=long.frame_indices[:5],
        annotated=long.annotated[:5],
    )
    batch = collate_clips([short, long])
    assert batch.frames.shape == (2, 12, 3, 32, 32) and batch.lengths.tolist() == [5, 12]
    assert batch.valid.sum(dim=1).tolist() == [5, 12]
    assert not batch.frames[0, 5:].any()
    assert torch.equal(batch.clips[0].frames, short.frames) and torch.equal(
        batch.clips[1].frames, long.frames
    )
    assert batch.clips[1].frames.data_ptr() == batch.frames[1].data_ptr()  # views, not copies
    assert batch.clips[0].masks.shape == (short.masks.shape[0], 5, 72, 96)


def test_calibration_set_is_the_same_on_every_rank(synth_set, ranks):
    picks = []
    for rank, world_size in [(0, 1), (1, 2), (3, 4)]:
        ranks(rank, world_size)
        picks.append(calibration_set(synth_set.videos, synth_set.images, 4, 6, 5, image_size=32, seed=1))
    for other in picks[1:]:
        assert [v.video_id for v in other.videos] == [v.video_id for v in picks[0].videos]
        for a, b in zip(other.videos, picks[0].videos, strict=True):
            assert a.frame_indices == b.frame_indices and torch.equal(a.frames, b.frames)
            assert torch.equal(a.masks, b.masks)
        assert [i.image_id for i in other.images] == [i.image_id for i in picks[0].images]
    videos = picks[0].videos
    assert len({v.video_id for v in videos}) == 4 and all(v.frames.shape == (6, 3, 32, 32) for v in videos)
    assert len(picks[0].images) == 5 and all(len(i.category_ids) > 0 for i in picks[0].images)
    other_seed = calibration_set(synth_set.videos, synth_set.images, 4, 6, 5, image_size=32, seed=2)
    assert [(v.video_id, v.frame_indices) for v in other_seed.videos] != [
        (v.video_id, v.frame_indices) for v in videos
    ]


def test_validation_set_decodes_each_item_when_indexed_and_selects_what_calibration_would(synth_set):
    """A lazy set keeps only shard references; each item read back equals the eagerly decoded one."""
    eager = calibration_set(synth_set.videos, synth_set.images, 3, 6, 2, image_size=32, seed=5)
    lazy = validation_set(synth_set.videos, synth_set.images, 3, 6, 2, image_size=32, seed=5)
    assert all(isinstance(ref, SampleRef) for ref in lazy.videos.refs + lazy.images.refs)
    assert len(lazy.videos) == 3 and len(lazy.images) == 2
    for got, want in zip(lazy.videos, eager.videos, strict=True):
        assert (got.video_id, got.frame_indices) == (want.video_id, want.frame_indices)
        assert torch.equal(got.frames, want.frames) and torch.equal(got.masks, want.masks)
    assert [s.image_id for s in lazy.images] == [s.image_id for s in eager.images]
    share = lazy.videos[1::2]  # a rank's share is lazy too
    assert isinstance(share, LazySamples) and [c.video_id for c in share] == [eager.videos[1].video_id]


def test_calibration_asks_for_more_than_the_shards_hold(synth_set):
    with pytest.raises(DataError, match=r"asked for 9 videos .*shards hold 8: lower data\.calib_videos"):
        calibration_set(synth_set.videos, None, num_videos=9, frames_per_video=12, num_images=0)
    with pytest.raises(DataError, match=r"asked for 17 images .*shards hold 16: lower data\.calib_images"):
        calibration_set(None, synth_set.images, num_videos=0, num_images=17)


@pytest.mark.parametrize(
    "spec",
    [
        "{folder}",
        "{folder}/",
        ["{folder}"],
        "{folder}/synth-*.tar",
        ["{folder}/synth-00000[01].tar", "{folder}/synth-00000[23].tar"],
        "{folder}/synth-{{000000..000003}}.tar",
        ["{folder}/synth-000000.tar", "{folder}", "{root}/vid*"],
    ],
    ids=["folder", "folder/", "[folder]", "glob", "[globs]", "brace", "[file, folder, glob of folders]"],
)
def test_shard_sources_of_every_kind_expand_to_the_shards(synth_set, spec):
    """The truth is the writer's own list of shards (4 in videos/); folders, globs, braces and paths mix."""
    folder = Path(synth_set.videos[0]).parent
    fill = {"folder": folder, "root": folder.parent}
    spec = [s.format(**fill) for s in spec] if isinstance(spec, list) else spec.format(**fill)
    shards = expand_urls(spec)
    assert set(shards) == set(synth_set.videos) and all(Path(s).is_file() for s in shards)


def test_calibration_reads_a_list_holding_a_folder(synth_set):
    """The shipped paper configs' form: `video_shards: [data/shards/sav_train]`."""
    folder = str(Path(synth_set.videos[0]).parent)
    assert len(calibration_set([folder], None, num_videos=1, frames_per_video=2, num_images=0).videos) == 1


@pytest.mark.parametrize(
    "spec,message",
    [
        ("empty", r"empty: no \.tar shards in this folder"),
        ("nothing-*.tar", r"nothing-\*\.tar: no file matches this pattern"),
        ([], "no shard URLs given"),
    ],
)
def test_a_source_that_names_no_shard_is_an_error_naming_it(tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    spec = str(tmp_path / spec) if isinstance(spec, str) else spec
    with pytest.raises(DataError, match=message):
        expand_urls(spec)


def test_a_folder_read_as_one_shard_is_named_a_folder_not_a_corrupt_tar(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: a folder, not a shard"):
        list(read_shard(str(tmp_path)))


def test_corrupt_shard_stops_the_loader_or_is_skipped(synth_set, tmp_path, caplog):
    shards = [shutil.copy(url, tmp_path) for url in synth_set.videos]
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=f"{shards[1]}: corrupt or truncated shard"):
        list(video_dataset(shards, 32, resampled=False, shuffle=False))
    with caplog.at_level(logging.WARNING, logger="mqsam2.data"):
        clips = list(video_dataset(shards, 32, resampled=False, shuffle=False, skip_bad=True))
    assert 6 <= len(clips) < 8
    assert any(shards[1] in record.getMessage() for record in caplog.records)


def test_frame_and_mask_of_different_sizes_is_an_error_or_skipped(tmp_path, caplog):
    with ShardWriter(tmp_path / "m.tar") as writer:
        writer.write(encode_video(_tiny_video("mismatch", size=(16, 24), mask_size=(17, 24))))
        writer.write(encode_video(_tiny_video("fine")))
    with pytest.raises(
        DataError, match=r"m\.tar \(sample mismatch-c0000\): frame is 16x24 but its masks are 17x24"
    ):
        list(video_dataset(str(tmp_path / "m.tar"), 16, resampled=False, shuffle=False))
    with caplog.at_level(logging.WARNING, logger="mqsam2.data"):
        clips = list(video_dataset(str(tmp_path / "m.tar"), 16, resampled=False, skip_bad=True))
    assert [c.video_id for c in clips] == ["fine"]
    assert "mismatch-c0000" in caplog.text


def test_epoch_len_needs_resampling(synth_set):
    with pytest.raises(ValueError, match="epoch_len needs resampled=True"):
        video_dataset(synth_set.videos, 32, resampled=False, epoch_len=4)


def test_more_ranks_than_shards_still_gives_every_rank_its_epoch(tmp_path, ranks):
    shards = _uneven_shards(tmp_path, [2])
    ranks(1, 2, 1, 2)
    with pytest.warns(UserWarning, match="rank 1 worker 1 has none of its own and draws from all"):
        clips = list(video_dataset(shards, 16, epoch_len=5))
    assert len(clips) == 2  # worker 1's part of 5 clips split over 2 workers


def test_only_epochs_with_a_length_have_one(synth_set):
    assert len(video_dataset(synth_set.videos, 32, epoch_len=6)) == 6
    with pytest.raises(TypeError, match="no length"):
        len(video_dataset(synth_set.videos, 32))
