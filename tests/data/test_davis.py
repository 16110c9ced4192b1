import numpy as np
import pytest
from PIL import Image

from mqsam2.data.davis import convert_davis
from mqsam2.data.format import DataError, decode_mask, decode_video, read_shard

from .layouts import build_davis


def _records(report):
    return {r.video_id: r for shard in report.shards for r in map(decode_video, read_shard(str(shard)))}


def test_palette_pngs_become_one_mask_per_object(tmp_path):
    fixtures = build_davis(tmp_path / "davis")
    report = convert_davis(tmp_path / "davis", tmp_path / "out", fps=30.0)
    records = _records(report)
    assert sorted(records) == ["clip-0", "clip-1"]  # the two listed in ImageSets/2017/val.txt
    for fixture in fixtures[:2]:
        record = records[fixture.video_id]
        assert record.jpegs == [fixture.frames[t].read_bytes() for t in sorted(fixture.frames)]
        assert record.frame_indices == [0, 1, 2, 3, 4]
        assert record.annotated == [0, 1, 2, 3]  # the last frame has no PNG
        assert (record.orig_size, record.fps, record.split) == ((48, 80), 30.0, "val")
        present = sorted(
            obj for obj, per_frame in fixture.masks.items() if any(m.any() for m in per_frame.values())
        )
        assert record.obj_ids == present
        for obj in present:
            for t, mask in fixture.masks[obj].items():
                assert np.array_equal(decode_mask(record.masks[obj][t]), mask)


def test_without_a_split_file_every_annotated_video_is_converted(tmp_path):
    build_davis(tmp_path / "davis")
    (tmp_path / "davis" / "ImageSets" / "2017" / "val.txt").unlink()
    assert sorted(_records(convert_davis(tmp_path / "davis", tmp_path / "out"))) == [
        "clip-0",
        "clip-1",
        "clip-2",
    ]


def test_png_without_its_frame_names_the_png(tmp_path):
    build_davis(tmp_path / "davis", videos=1, listed=1)
    (tmp_path / "davis" / "JPEGImages" / "480p" / "clip-0" / "00002.jpg").unlink()
    with pytest.raises(DataError, match=r"clip-0/00002\.png: has no frame 2"):
        convert_davis(tmp_path / "davis", tmp_path / "out")


def test_rgb_mask_is_refused(tmp_path):
    build_davis(tmp_path / "davis", videos=1, listed=1)
    png = tmp_path / "davis" / "Annotations" / "480p" / "clip-0" / "00001.png"
    Image.open(png).convert("RGB").save(png)
    with pytest.raises(DataError, match=f"{png}: mask PNG is RGB; expected a single-channel or palette PNG"):
        convert_davis(tmp_path / "davis", tmp_path / "out")


def test_unknown_layout(tmp_path):
    build_davis(tmp_path / "davis", videos=1, listed=1)
    with pytest.raises(DataError, match="unknown layout: DAVIS needs JPEGImages/1080p"):
        convert_davis(tmp_path / "davis", tmp_path / "out", resolution="1080p")
