import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mqsam2.data.format import (
    DataError,
    ImageRecord,
    ShardWriter,
    VideoRecord,
    decode_image,
    decode_video,
    encode_image,
    encode_mask,
    encode_video,
    read_shard,
)
from mqsam2.data.loaders import clip_window, to_clip
from mqsam2.data.synth import render_clip, render_image


def _jpeg(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _record(video_id="sav.7/x", frames=9, annotate_every=4, seed=1):
    pixels, masks = render_clip(seed, frames, (40, 56), num_objects=3)
    annotated = list(range(0, frames, annotate_every))
    record = VideoRecord(
        video_id=video_id,
        frame_indices=[10 + t for t in range(frames)],
        jpegs=[_jpeg(p) for p in pixels],
        annotated=[10 + t for t in annotated],
        masks={obj: {10 + t: encode_mask(m[t]) for t in annotated} for obj, m in masks.items()},
        orig_size=(40, 56),
        fps=24.0,
        split="val",
        clip=2,
        source="test",
    )
    return record, masks


def _write(path, samples):
    with ShardWriter(path) as writer:
        for sample in samples:
            writer.write(sample)


def test_video_round_trip_keeps_frames_masks_and_metadata(tmp_path):
    record, masks = _record()
    _write(tmp_path / "v.tar", [encode_video(record)])
    with tarfile.open(tmp_path / "v.tar") as tar:
        names = tar.getnames()
    assert all(name.count(".") >= 1 and "." not in name.split(".")[0] for name in names)

    [sample] = list(read_shard(str(tmp_path / "v.tar")))
    back = decode_video(sample)
    assert back == record

    clip = to_clip(back, range(9), image_size=32, where="test")
    assert clip.annotated.tolist() == [t % 4 == 0 for t in range(9)]
    for o, obj in enumerate(clip.obj_ids):
        for t in range(9):
            expected = masks[obj][t] if t % 4 == 0 else np.zeros((40, 56), bool)
            assert torch.equal(clip.masks[o, t], torch.from_numpy(expected))


def test_image_round_trip(tmp_path):
    pixels, masks, categories = render_image(4, (50, 70))
    anns = [
        {
            "id": k,
            "category_id": categories[k],
            "bbox": [1.0, 2.0, 3.0, 4.0],
            "iscrowd": 0,
            "segmentation": encode_mask(m),
        }
        for k, m in masks.items()
    ]
    record = ImageRecord(42, _jpeg(pixels), (50, 70), anns, "x.jpg", "val2017", "test")
    _write(tmp_path / "i.tar", [encode_image(record)])
    [sample] = list(read_shard(str(tmp_path / "i.tar")))
    back = decode_image(sample)
    assert back == record


def test_writer_publishes_only_complete_shards(tmp_path):
    record, _ = _record()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "s.tar") as writer:
        writer.write(encode_video(record))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def _member_boundary(path):
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    return middle.offset  # where a member's header starts: everything before it is whole


@pytest.mark.parametrize("cut", ["mid-member", "member-boundary", "garbage"])
def test_truncated_or_corrupt_shard_names_the_file(tmp_path, cut):
    record, _ = _record()
    good = tmp_path / "good.tar"
    _write(good, [encode_video(record), encode_video(_record(video_id="b", seed=2)[0])])
    data = good.read_bytes()
    bad = tmp_path / "bad.tar"
    if cut == "mid-member":
        bad.write_bytes(data[: len(data) // 2 + 100])
    elif cut == "member-boundary":
        bad.write_bytes(data[: _member_boundary(good)])
    else:
        bad.write_bytes(b"not a tar" * 1000)
    with pytest.raises(DataError, match=f"{bad}: (corrupt or truncated|truncated) shard"):
        list(read_shard(str(bad)))


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tar: no such shard"):
        list(read_shard(str(tmp_path / "nope.tar")))


def test_sample_missing_a_listed_frame_or_mask_is_an_error(tmp_path):
    record, _ = _record()
    sample = encode_video(record)
    del sample["000011.jpg"]
    with pytest.raises(DataError, match=r"frame 11 is listed but 000011\.jpg is missing"):
        decode_video(sample)
    sample = encode_video(record)
    masks = json.loads(sample["masks.json"])
    del masks["2"]["14"]
    sample["masks.json"] = json.dumps(masks).encode()
    with pytest.raises(DataError, match="no mask for object 2 at annotated frame 14"):
        decode_video(sample)


def test_mask_of_another_size_is_refused():
    record, _ = _record()
    record.masks[1][10] = encode_mask(np.zeros((41, 56), bool))
    with pytest.raises(DataError, match="mask is 41x56 but the frame is 40x56"):
        encode_video(record)


def test_image_shard_is_not_a_video(tmp_path):
    pixels, _, _ = render_image(1, 32)
    sample = encode_image(ImageRecord(1, _jpeg(pixels), (32, 32)))
    with pytest.raises(DataError, match="holds a 'image' sample where a video was expected"):
        decode_video(sample)


def test_clips_split_a_video_into_consecutive_pieces():
    record, _ = _record(frames=9)
    pieces = record.clips(4)
    assert [p.frame_indices for p in pieces] == [[10, 11, 12, 13], [14, 15, 16, 17], [18]]
    assert [p.annotated for p in pieces] == [[10], [14], [18]]
    assert [p.key for p in pieces] == ["sav_7_x-c0000", "sav_7_x-c0001", "sav_7_x-c0002"]
    assert b"".join(b"".join(p.jpegs) for p in pieces) == b"".join(record.jpegs)


def test_clip_window_starts_on_an_annotated_frame():
    record, _ = _record(frames=9)
    for seed in range(20):
        window = clip_window(record, 5, random.Random(seed))
        assert len(window) == 5 and record.frame_indices[window.start] in record.annotated
    assert clip_window(record, 50, random.Random(0)) == range(9)
