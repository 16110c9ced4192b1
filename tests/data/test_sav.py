import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mqsam2.data.format import DataError, decode_mask, decode_video, read_shard
from mqsam2.data.sav import convert_sav

from .layouts import SAV_SIZE, build_sav


def _records(report):
    return {r.video_id: r for shard in report.shards for r in map(decode_video, read_shard(str(shard)))}


def _assert_matches(record, fixture):
    assert record.frame_indices == sorted(fixture.frames)
    assert record.jpegs == [fixture.frames[t].read_bytes() for t in sorted(fixture.frames)]
    assert record.annotated == [0, 4, 8]
    assert record.obj_ids == sorted(fixture.masks)
    assert (record.orig_size, record.fps) == (SAV_SIZE, 24.0)
    for obj, per_frame in fixture.masks.items():
        for t, mask in per_frame.items():
            assert np.array_equal(decode_mask(record.masks[obj][t]), mask)


def test_png_layout(tmp_path):
    fixtures = build_sav(tmp_path / "sav")
    report = convert_sav(tmp_path / "sav", tmp_path / "out", split="val", shard_size=2)
    assert [p.name for p in report.shards] == ["sav-000000.tar", "sav-000001.tar"]
    records = _records(report)
    assert sorted(records) == [f.video_id for f in fixtures]
    for fixture in fixtures:
        _assert_matches(records[fixture.video_id], fixture)
        assert records[fixture.video_id].split == "val"


def test_manifest_layout_reads_manual_masklets_only(tmp_path):
    fixtures = build_sav(tmp_path / "sav", videos=2, manifest=True)
    report = convert_sav(tmp_path / "sav", tmp_path / "out")
    records = _records(report)
    assert sorted(records) == [f.video_id for f in fixtures]
    for fixture in fixtures:
        _assert_matches(records[fixture.video_id], fixture)
        assert records[fixture.video_id].split == "train"


def test_clip_len_cuts_videos_into_samples(tmp_path):
    build_sav(tmp_path / "sav", videos=1)
    report = convert_sav(tmp_path / "sav", tmp_path / "out", clip_len=4)
    clips = [decode_video(s) for s in read_shard(str(report.shards[0]))]
    assert [(c.clip, c.frame_indices, c.annotated) for c in clips] == [
        (0, [0, 1, 2, 3], [0]),
        (1, [4, 5, 6, 7], [4]),
        (2, [8], [8]),
    ]


def test_parallel_build_equals_serial_and_resumes(tmp_path):
    build_sav(tmp_path / "sav", videos=4)
    serial = convert_sav(tmp_path / "sav", tmp_path / "serial", shard_size=1)
    parallel = convert_sav(tmp_path / "sav", tmp_path / "parallel", shard_size=1, workers=2)
    assert [p.read_bytes() for p in serial.shards] == [p.read_bytes() for p in parallel.shards]

    parallel.shards[2].unlink()
    again = convert_sav(tmp_path / "sav", tmp_path / "parallel", shard_size=1, workers=2)
    assert (again.built, again.resumed, again.samples) == (1, 3, 1)
    assert parallel.shards[2].read_bytes() == serial.shards[2].read_bytes()
    with pytest.raises(DataError, match="built with different settings \\(shard_size\\)"):
        convert_sav(tmp_path / "sav", tmp_path / "parallel", shard_size=2)


def test_missing_mask_names_the_object_folder_and_skip_bad_counts_it(tmp_path):
    build_sav(tmp_path / "sav")
    missing = tmp_path / "sav" / "Annotations_6fps" / "sav_000002" / "001" / "00004.png"
    missing.unlink()
    with pytest.raises(DataError, match=r"sav_000002/001: no mask for annotated frame 4"):
        convert_sav(tmp_path / "sav", tmp_path / "out", shard_size=2)
    assert not any((tmp_path / "out").glob("*.tar*"))

    report = convert_sav(tmp_path / "sav", tmp_path / "out", shard_size=2, skip_bad=True)
    assert (report.samples, len(report.skipped)) == (2, 1)
    assert sorted(_records(report)) == ["sav_000001", "sav_000003"]


def test_mask_of_another_size_names_the_png(tmp_path):
    build_sav(tmp_path / "sav", videos=1)
    png = tmp_path / "sav" / "Annotations_6fps" / "sav_000001" / "000" / "00008.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(png)
    with pytest.raises(DataError, match=f"{png}: mask is 10x10 but frame .*00008.jpg is 72x96"):
        convert_sav(tmp_path / "sav", tmp_path / "out")


def test_truncated_frame_names_the_jpeg(tmp_path):
    build_sav(tmp_path / "sav", videos=1)
    frame = tmp_path / "sav" / "JPEGImages_24fps" / "sav_000001" / "00003.jpg"
    frame.write_bytes(frame.read_bytes()[:300])
    with pytest.raises(DataError, match=f"{frame}: unreadable JPEG"):
        convert_sav(tmp_path / "sav", tmp_path / "out")


def test_manifest_with_a_mask_per_object_missing(tmp_path):
    build_sav(tmp_path / "sav", videos=1, manifest=True)
    manifest = tmp_path / "sav" / "sav_000001_manual.json"
    meta = json.loads(manifest.read_text())
    meta["masklet"][1] = meta["masklet"][1][:1]
    manifest.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="frame 4 has 1 masks for 2 masklet ids"):
        convert_sav(tmp_path / "sav", tmp_path / "out")


def test_unknown_layout(tmp_path):
    build_sav(tmp_path / "sav", videos=1)
    shutil.rmtree(tmp_path / "sav" / "Annotations_6fps")
    with pytest.raises(DataError, match="unknown layout"):
        convert_sav(tmp_path / "sav", tmp_path / "out")
    with pytest.raises(DataError, match="unknown layout: SA-V needs JPEGImages_24fps"):
        convert_sav(tmp_path / "elsewhere", tmp_path / "out")
