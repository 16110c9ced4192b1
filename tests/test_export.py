"""The packed export: bit packing against a bit-by-bit reference, sizes against the formula, and a loaded export
whose video and image outputs equal the in-memory quantized SAM2's exactly."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib

import pytest
import torch
import yaml

from mqsam2.config import FitConfig, ModelConfig, ReconstructionConfig, config_dict
from mqsam2.errors import MQSAM2Error
from mqsam2.export import export_model, load_export, pack_codes, read_header, unpack_codes
from mqsam2.export.__main__ import main as export_cli
from mqsam2.export.card import float_checkpoint_bytes
from mqsam2.memory.predictor import Prompt
from mqsam2.models import TensorImagePredictor, build_sam2
from mqsam2.quant import QuantConfig, calibration, quantizable_layers, quantize, quantized_layers
from mqsam2.quant.checkpoint import save_quantized
from mqsam2.reconstruct.phases import phases
from mqsam2.reconstruct.units import reconstruction_units
from mqsam2.rundir import RunDir
from tests.conftest import _moving_square_clip

SIZE = 128  # the smallest input that keeps every SAM2 stage non-trivial; fast on CPU
OTHER_CONFIG = "configs/sam2.1/sam2.1_hiera_s.yaml"


def reference_pack(codes: list[int], bits: int) -> bytes:
    """The documented bit order, one bit at a time: code i's bit k is stream bit i*bits+k, LSB-first bytes."""
    stream = [(code >> k) & 1 for code in codes for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [1, 3, 8, 13, 64, 1001])
def test_pack_round_trip_matches_the_bit_reference(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits * numel))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(numel * bits / 8)
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes.to(torch.uint8))


def test_pack_keeps_any_shape_and_dtype():
    codes = torch.randint(0, 32, (7, 3, 5), dtype=torch.int32)
    packed = pack_codes(codes, 5)
    assert packed.numel() == math.ceil(105 * 5 / 8)
    assert torch.equal(unpack_codes(packed, 5, 105).reshape(7, 3, 5), codes.to(torch.uint8))


def test_pack_rejects_bad_input():
    with pytest.raises(MQSAM2Error, match="outside 0..7"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(MQSAM2Error, match="integer codes"):
        pack_codes(torch.tensor([1.0]), 3)
    with pytest.raises(MQSAM2Error, match="bit-width"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(MQSAM2Error, match="take 4 packed bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 10)


def _clip():
    frames, masks = _moving_square_clip(frames=4, size=SIZE)
    return frames, {1: Prompt.from_mask(0, masks[0])}


@pytest.fixture(scope="module")
def quantized():
    """Random-init SAM2.1-tiny with every width 2..8 in its plan, quantized attention, calibrated on a clip
    and an image, and one layer whose rounding was learned (random AdaRound offsets, then hardened)."""
    model = build_sam2("t", image_size=SIZE)
    plan = {name: 2 + i % 7 for i, name in enumerate(quantizable_layers(model))}
    quantize(model, QuantConfig(plan=plan, quantize_attention=True))
    frames, prompts = _clip()
    with calibration(model):
        model.track_clip(frames, (SIZE, SIZE), prompts)
        _segment_image(model)
    layer = quantized_layers(model)["image_encoder.trunk.blocks.1.mlp.layers.0"]
    alpha = layer.weight_quantizer.start_adaround(layer.weight)
    with torch.no_grad():
        alpha.copy_(torch.randn(alpha.shape, generator=torch.Generator().manual_seed(0)))
    layer.harden_rounding()
    return model


def _segment_image(model):
    predictor = TensorImagePredictor(model)
    frames, _ = _clip()
    predictor.set_image_tensor(frames[1], (SIZE, SIZE))
    return predictor.predict(box=[[30, 40, 100, 110]], multimask_output=False, return_logits=True)


def _video_logits(model):
    frames, prompts = _clip()
    state = model.init_state_from_frames(frames, (SIZE, SIZE))
    model.add_prompt(state, 1, prompts[1])
    return torch.stack([logits for _, _, logits in model.propagate_in_video(state)])


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.mq"
    card = export_model(quantized, path, card_extra={"calibration": {"videos": 1, "images": 1}})
    return path, card, load_export(path)


def test_loaded_weights_equal_the_fake_quant_weights_bit_for_bit(quantized, exported):
    loaded = quantized_layers(exported[2])
    for name, layer in quantized_layers(quantized).items():
        expected = layer.quantized_weight()
        assert torch.equal(loaded[name].weight, expected), name
        assert torch.equal(loaded[name].quantized_weight(), expected), name


def test_loaded_export_tracks_video_identically(quantized, exported):
    expected = _video_logits(quantized)
    assert torch.equal(_video_logits(exported[2]), expected)
    assert (expected > 0).any() and (expected < 0).any()  # a real mask, not a constant


def test_loaded_export_segments_images_identically(quantized, exported):
    for got, expected in zip(_segment_image(exported[2]), _segment_image(quantized), strict=True):
        assert (got == expected).all()


def test_bytes_on_disk_match_the_packing_formula(quantized, exported):
    path, card, _ = exported
    header, _ = read_header(path)
    header_bytes = struct.unpack("<Q", path.read_bytes()[8:16])[0]
    codes = sum(
        math.ceil(layer.weight.numel() * layer.bits / 8) for layer in quantized_layers(quantized).values()
    )
    channel_params = sum(
        5 * layer.weight.shape[0] for layer in quantized_layers(quantized).values()
    )  # fp32 + u8
    layer_weights = {f"{name}.weight" for name in quantized_layers(quantized)}
    floats = sum(
        t.numel() * t.element_size()
        for key, t in quantized.state_dict().items()
        if "_quantizer." not in key and key not in layer_weights
    )
    theoretical = codes + channel_params + floats
    on_disk = path.stat().st_size
    assert on_disk == 16 + header_bytes + theoretical + 32  # prefix, header, payload, SHA-256 trailer
    assert abs(on_disk - theoretical) <= 0.05 * theoretical
    assert card["bytes"]["file_on_disk"] == on_disk and card["bytes"]["packed_codes"] == codes
    assert {int(b) for b in card["plan"]["layers_per_bits"]} == set(range(2, 9))
    assert header["model"]["sam2_config"] == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert card["bytes"]["fp_checkpoint"] == float_checkpoint_bytes(quantized) > 5 * on_disk


def test_model_card_is_written_next_to_the_export(exported):
    path, card, _ = exported
    on_disk = json.loads((path.parent / "model_card.json").read_text())
    assert on_disk["bytes"] == card["bytes"] and on_disk["calibration"] == {"videos": 1, "images": 1}
    markdown = (path.parent / "model_card.md").read_text()
    assert "configs/sam2.1/sam2.1_hiera_t.yaml" in markdown and "compression" in markdown


def test_float16_option_halves_float_tensors_and_stays_close(quantized, exported, tmp_path):
    card = export_model(quantized, tmp_path / "half.mq", float_dtype=torch.float16)
    assert card["bytes"]["float_tensors"] * 2 == exported[1]["bytes"]["float_tensors"]
    assert card["bytes"]["packed_codes"] == exported[1]["bytes"]["packed_codes"]
    half = load_export(tmp_path / "half.mq")
    assert all(p.dtype == torch.float32 for p in half.parameters())


def test_exporting_a_float_model_names_both_sides(tmp_path):
    with pytest.raises(
        MQSAM2Error, match=r"cannot export configs/sam2.1/sam2.1_hiera_t.yaml: the model is a float"
    ):
        export_model(build_sam2("t", image_size=SIZE), tmp_path / "model.mq")


def test_loading_against_another_config_names_both_sides(exported):
    with pytest.raises(
        MQSAM2Error, match=r"quantized configs/sam2.1/sam2.1_hiera_t.yaml, but .*hiera_s.yaml was requested"
    ):
        load_export(exported[0], sam2_config=OTHER_CONFIG)


def _split(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[8:16])[0]
    return json.loads(data[16 : 16 + length]), data[16 + length : -32]


def _signed(header: dict, payload: bytes) -> bytes:
    """A file with this header, as a writer would sign it (prefix, header, payload, SHA-256 of them)."""
    text = json.dumps(header).encode()
    body = b"MQSAM2PK" + struct.pack("<Q", len(text)) + text + payload
    return body + hashlib.sha256(body).digest()


def test_checksums_are_the_sha256_of_the_file_and_the_crc32_of_each_tensor(quantized, exported):
    data = exported[0].read_bytes()
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    header, _ = _split(data)
    key = "maskmem_tpos_enc"
    crc = header["tensors"][key]["data"][2]
    assert crc == zlib.crc32(quantized.state_dict()[key].contiguous().numpy().tobytes())


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            "payload",
            r"damaged: the bytes of image_encoder\.trunk\.blocks\.0\.attn\.qkv \(codes\) do not match",
        ),
        ("header", r"is damaged|header is damaged"),
        ("truncated", r"is damaged: payload of \d+ bytes, header says \d+"),
        ("trailer", r"is damaged: its checksum does not match"),
    ],
    ids=lambda value: value if value.isalpha() else "",
)
def test_a_damaged_export_is_refused_naming_the_damage(exported, tmp_path, damage, message):
    data = bytearray(exported[0].read_bytes())
    length = struct.unpack("<Q", data[8:16])[0]
    if damage == "payload":
        data[16 + length + 1000] ^= 0x01  # one bit of one tensor
    elif damage == "header":
        data[16 + length // 2] ^= 0x01
    elif damage == "truncated":
        del data[-1000:]
    else:
        data[-1] ^= 0x01
    (tmp_path / "bad.mq").write_bytes(bytes(data))
    with pytest.raises(MQSAM2Error, match=message):
        load_export(tmp_path / "bad.mq")


def test_version_1_files_without_checksums_still_load(quantized, exported, tmp_path):
    header, payload = _split(exported[0].read_bytes())
    header["version"] = 1
    for entry in [*header["weights"].values(), *header["tensors"].values()]:
        for part in ("codes", "scale", "zero_point", "data"):
            if part in entry:
                entry[part] = entry[part][:2]
    text = json.dumps(header).encode()
    (tmp_path / "v1.mq").write_bytes(b"MQSAM2PK" + struct.pack("<Q", len(text)) + text + payload)
    loaded = load_export(tmp_path / "v1.mq").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in exported[2].state_dict().items())


def test_header_config_that_does_not_fit_the_tensors_names_both_sides(exported, tmp_path):
    header, payload = _split(exported[0].read_bytes())
    header["model"]["sam2_config"] = OTHER_CONFIG
    (tmp_path / "bad.mq").write_bytes(_signed(header, payload))
    with pytest.raises(
        MQSAM2Error, match=r"do not fit its SAM2 config .*hiera_s.yaml .*they fit .*hiera_t.yaml"
    ):
        load_export(tmp_path / "bad.mq")


def test_not_an_export_is_refused(tmp_path):
    (tmp_path / "x.mq").write_bytes(b"not an export at all")
    with pytest.raises(MQSAM2Error, match="not an mqsam2 export"):
        load_export(tmp_path / "x.mq")


def test_cli_exports_a_saved_quantized_model(quantized, exported, tmp_path, capsys):
    save_quantized(quantized, tmp_path / "q.pt")
    assert export_cli(["--model", str(tmp_path / "q.pt")]) == 0
    assert (tmp_path / "q.mq").read_bytes() == exported[0].read_bytes()
    assert "compression" in capsys.readouterr().out
    assert export_cli(["--model", str(tmp_path / "missing.pt")]) == 2


def test_cli_exports_a_run_directory(quantized, exported, tmp_path):
    """A run directory as fit leaves it (config, plan, calibrated state, each unit's finished phase) rebuilds
    to the same model: the export is byte-identical to the in-memory one."""
    quant = quantized.mqsam2_quant_config
    config = FitConfig(
        name="unit",
        model=ModelConfig(size="t", image_size=SIZE),
        quant=quant,
        reconstruction=ReconstructionConfig(mode="qdrop"),
    )
    run_dir = tmp_path / "unit"
    run_dir.mkdir()
    payload = config_dict(config)
    payload["quant"]["plan"] = None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(payload))
    (run_dir / "plan.json").write_text(json.dumps({"bits": dict(quant.plan)}))
    units = reconstruction_units(quantized, "qdrop")
    calibrated = {k: v.clone() for k, v in quantized.state_dict().items()}
    for layer in (name for unit in units for name in unit.layers):  # reconstruction changes the weights...
        calibrated[f"{layer}.weight"] += 1.0
    torch.save(calibrated, run_dir / "calibrated.pt")
    run = RunDir(run_dir)
    with pytest.raises(MQSAM2Error, match="is unfinished: unit image_encoder.trunk.blocks.0 has no qdrop.pt"):
        run.load_model()
    for unit in units:  # ...and each unit's phase file holds the result
        for phase in phases(config.reconstruction):
            run.unit_dir(unit.name).mkdir(parents=True, exist_ok=True)
            torch.save(unit.module.state_dict(), run.phase_state(unit.name, phase.name))
    assert export_cli(["--run", str(run_dir)]) == 0
    assert (run_dir / "export" / "model.mq").read_bytes() == exported[0].read_bytes()
    assert json.loads((run_dir / "export" / "model_card.json").read_text())["name"] == "unit"
