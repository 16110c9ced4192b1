"""build_sam2: sam2's configs, Meta's checkpoint format, strict checks with useful errors."""

import pytest
import torch
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.memory import VideoPredictor
from mqsam2.models import build_sam2, config_name

INVENTORY = {  # nn.Linear, nn.Conv2d, parameters: counted from sam2 1.1.0's SAM2.1 configs
    "t": (149, 20, 38_962_498),
    "b+": (197, 20, 80_850_178),
    "l": (293, 20, 224_446_642),
}


@pytest.mark.parametrize("size", ["t", "b+", "l"])
def test_sizes_build_the_published_architectures(size):
    model = build_sam2(size, image_size=256, video=False)
    linears, convs, params = INVENTORY[size]
    assert sum(type(m) is nn.Linear for m in model.modules()) == linears
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == convs
    assert sum(p.numel() for p in model.parameters()) == params


def test_video_predictor_is_ours_and_seeded(caplog):
    with caplog.at_level("WARNING"):
        first = build_sam2("t", image_size=256, seed=3)
    second = build_sam2("t", image_size=256, seed=3)
    other = build_sam2("t", image_size=256, seed=4)
    assert isinstance(first, VideoPredictor)
    assert "RANDOM-INIT" in caplog.text
    key = "image_encoder.trunk.blocks.0.attn.qkv.weight"
    assert torch.equal(first.state_dict()[key], second.state_dict()[key])
    assert not torch.equal(first.state_dict()[key], other.state_dict()[key])


def test_meta_checkpoint_round_trip(tmp_path):
    source = build_sam2("t", image_size=256, seed=7, video=False)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": source.state_dict()}, path)
    loaded = build_sam2("t", checkpoint=path, image_size=256, seed=0)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_of_another_size_names_the_config_that_fits(tmp_path):
    path = tmp_path / "small.pt"
    torch.save({"model": build_sam2("s", image_size=256, video=False).state_dict()}, path)
    with pytest.raises(
        MQSAM2Error, match=r"does not match .*hiera_t.*fits configs/sam2.1/sam2.1_hiera_s.yaml"
    ):
        build_sam2("t", checkpoint=path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [({"state_dict": {}}, "Meta's format"), ([1, 2], "Meta's format")],
)
def test_wrong_checkpoint_formats(tmp_path, payload, message):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(MQSAM2Error, match=message):
        build_sam2("t", checkpoint=path)


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(MQSAM2Error, match="not found"):
        build_sam2("t", checkpoint=tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(MQSAM2Error, match="cannot read"):
        build_sam2("t", checkpoint=corrupt)


def test_config_names_and_bad_sizes():
    assert config_name("base_plus") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert config_name("large", "2") == "configs/sam2/sam2_hiera_l.yaml"
    with pytest.raises(MQSAM2Error, match="t, s, b\\+, l"):
        config_name("huge")
    with pytest.raises(MQSAM2Error, match="multiple of 32"):
        build_sam2("t", image_size=100)
