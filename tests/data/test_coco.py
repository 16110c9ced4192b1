import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from mqsam2.data.coco import convert_coco
from mqsam2.data.format import DataError, decode_image, decode_mask, read_shard
from mqsam2.data.loaders import image_dataset

from .layouts import build_coco


def test_every_segmentation_kind_round_trips(tmp_path):
    annotations = build_coco(tmp_path / "coco")
    report = convert_coco(tmp_path / "coco" / "val2017", annotations, tmp_path / "out", shard_size=2)
    assert len(report.shards) == 2
    truth = COCO(str(annotations))
    records = [decode_image(s) for shard in report.shards for s in read_shard(str(shard))]
    assert [r.image_id for r in records] == [1, 2, 3]
    for record in records:
        info = truth.imgs[record.image_id]
        assert record.jpeg == (tmp_path / "coco" / "val2017" / info["file_name"]).read_bytes()
        assert (record.orig_size, record.split) == ((info["height"], info["width"]), "val2017")
        expected = truth.imgToAnns[record.image_id]
        assert [a["id"] for a in record.annotations] == [a["id"] for a in expected]
        for stored, original in zip(record.annotations, expected, strict=True):
            assert np.array_equal(decode_mask(stored["segmentation"]), truth.annToMask(original).astype(bool))
            assert stored["bbox"] == original["bbox"] and stored["iscrowd"] == original["iscrowd"]
            assert stored["category"] == truth.cats[original["category_id"]]["name"]
    assert records[2].annotations == []


def test_loader_gives_xyxy_boxes_and_leaves_crowds_out(tmp_path):
    annotations = build_coco(tmp_path / "coco")
    report = convert_coco(tmp_path / "coco" / "val2017", annotations, tmp_path / "out")
    truth = COCO(str(annotations))
    for crowd in (False, True):
        samples = {
            s.image_id: s for s in image_dataset(report.shards, 64, resampled=False, include_crowd=crowd)
        }
        for image_id, sample in samples.items():
            expected = [a for a in truth.imgToAnns[image_id] if crowd or not a["iscrowd"]]
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in expected)]
            assert torch.equal(sample.boxes, torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
            assert sample.category_ids == [a["category_id"] for a in expected]
            assert sample.masks.shape == (len(expected), 60, 90) and sample.image.shape == (3, 64, 64)
    assert samples[2].masks.shape[0] == len(truth.imgToAnns[2])


def test_image_of_another_size_names_the_image(tmp_path):
    annotations = build_coco(tmp_path / "coco")
    data = json.loads(annotations.read_text())
    data["images"][1]["height"] = 61
    annotations.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"000000000002\.jpg: image is 60x90 but .*instances_val2017\.json says 61x90"
    ):
        convert_coco(tmp_path / "coco" / "val2017", annotations, tmp_path / "out")


def test_missing_image_is_skipped_with_skip_bad(tmp_path):
    annotations = build_coco(tmp_path / "coco")
    missing = tmp_path / "coco" / "val2017" / "000000000001.jpg"
    missing.unlink()
    with pytest.raises(DataError, match=f"{missing}: cannot read the file"):
        convert_coco(tmp_path / "coco" / "val2017", annotations, tmp_path / "out")
    report = convert_coco(tmp_path / "coco" / "val2017", annotations, tmp_path / "out", skip_bad=True)
    assert (report.samples, len(report.skipped)) == (2, 1)


def test_not_a_coco_file(tmp_path):
    build_coco(tmp_path / "coco")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"videos": []}))
    with pytest.raises(DataError, match=r"other\.json: unknown layout: not a COCO instances file"):
        convert_coco(tmp_path / "coco" / "val2017", other, tmp_path / "out")
