"""The ONNX video tracker (five ONNX Runtime sessions, the tracking loop in numpy) against sam2's PyTorch
tracker (`VideoPredictor.track_clip`, FIFO and SIS), its numpy pieces against their torch originals, the
integer codes read back from the graphs, and the folder-tracking command."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from mqsam2.data.loaders import load_frame
from mqsam2.deploy.onnx import OnnxVideoTracker, TrackPrompt, export_video_tracker
from mqsam2.deploy.onnx.layout import MEMORY_ATTENTION_INPUTS, MEMORY_ENCODER_INPUTS
from mqsam2.deploy.onnx.memory_bank import MemoryBank, to_bfloat16
from mqsam2.deploy.onnx.sessions import session
from mqsam2.deploy.onnx.track import DAVIS_PALETTE, prepare_frame
from mqsam2.deploy.onnx.track import main as track_cli
from mqsam2.deploy.onnx.tracker import resize_bilinear
from mqsam2.deploy.onnx.video import MemoryAttentionGraph, MemoryEncoderGraph, video_example_inputs
from mqsam2.errors import MQSAM2Error
from mqsam2.memory import Prompt, set_memory_policy
from mqsam2.memory.sis import MemoryBank as TorchMemoryBank
from mqsam2.memory.sis import MemoryEntry
from mqsam2.metrics import region_similarity
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantizable_layers, quantize
from tests.conftest import _moving_square_clip

SIZE = 128
VIDEO = (96, 144)  # a video size unlike the model's, so the prompts and masks are rescaled both ways
SIS = {"capacity": 2, "k": 2}  # small enough that the bank fuses within the clip


def _clip() -> tuple[torch.Tensor, dict[int, Prompt]]:
    """Seven frames (the square goes and comes back) and two objects, the second prompted on frame 2."""
    frames, masks = _moving_square_clip(frames=4, size=SIZE)
    frames, masks = torch.cat([frames, frames.flip(0)[1:]]), torch.cat([masks, masks.flip(0)[1:]])
    video_masks = torch.nn.functional.interpolate(masks[:, None].float(), VIDEO)[:, 0] > 0.5
    return frames, {1: Prompt.from_mask(0, video_masks[0]), 4: Prompt.from_mask(2, video_masks[2])}


NETWORKS = (
    ("memory_attention", MemoryAttentionGraph, MEMORY_ATTENTION_INPUTS),
    ("memory_encoder", MemoryEncoderGraph, MEMORY_ENCODER_INPUTS),
)


def _first_output(graph: torch.nn.Module, inputs: dict, names: tuple[str, ...]) -> np.ndarray:
    """The graph module's (first) output on `inputs`, in the module's own dtype, as float32 numpy."""
    dtype = next(graph.parameters()).dtype
    with torch.no_grad():
        out = graph(*(inputs[n].to(dtype) for n in names))
    return (out[0] if isinstance(out, tuple) else out).float().numpy()


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _track_prompts(prompts: dict[int, Prompt]) -> dict[int, TrackPrompt]:
    return {obj_id: TrackPrompt(p.frame, box=p.box) for obj_id, p in prompts.items()}


@pytest.fixture(scope="module")
def float_tracker(tmp_path_factory):
    model = build_sam2("t", image_size=SIZE)
    directory = tmp_path_factory.mktemp("tracker")
    export_video_tracker(model, directory)
    return model, directory


@pytest.mark.slow  # the tracker's graphs through torch.export: about 30 s
@pytest.mark.parametrize("policy", ["fifo", "sis"])
def test_onnx_tracker_masks_equal_the_pytorch_trackers(float_tracker, policy):
    model, directory = float_tracker
    frames, prompts = _clip()
    set_memory_policy(model, policy, **(SIS if policy == "sis" else {}))
    want = model.track_clip(frames, VIDEO, prompts)
    tracker = OnnxVideoTracker(
        directory, threads=2, policy=policy, memory_options=SIS if policy == "sis" else None
    )
    got = tracker.track(frames.numpy(), VIDEO, _track_prompts(prompts))
    for row, obj_id in enumerate(prompts):
        np.testing.assert_array_equal(got[obj_id], want[row].numpy())
    assert not got[4][:2].any() and got[4][2:].any()  # empty before its prompt frame


@pytest.mark.slow
def test_sis_and_fifo_differ_on_this_clip(float_tracker):
    """The clip is long enough for the SIS bank to fuse, so the SIS test above checks the fusion."""
    _, directory = float_tracker
    frames, prompts = _clip()
    masks = {
        policy: OnnxVideoTracker(directory, policy=policy, memory_options=options).track(
            frames.numpy(), VIDEO, _track_prompts(prompts)
        )
        for policy, options in (("fifo", None), ("sis", SIS))
    }
    assert any((masks["fifo"][obj] != masks["sis"][obj]).any() for obj in prompts)


@pytest.mark.slow
def test_track_command_writes_what_the_tracker_tracks(float_tracker, tmp_path, capsys):
    _, directory = float_tracker
    rng = np.random.default_rng(0)
    jpegs, annotations = tmp_path / "JPEGImages", tmp_path / "Annotations"
    jpegs.mkdir()
    annotations.mkdir()
    for t in range(4):
        Image.fromarray(rng.integers(0, 255, (*VIDEO, 3), np.uint8)).save(jpegs / f"{t:05d}.jpg")
    label = np.zeros(VIDEO, np.uint8)
    label[20:50, 30:90], label[60:80, 10:40] = 1, 3
    annotation = Image.fromarray(label, mode="P")
    annotation.putpalette(DAVIS_PALETTE)
    annotation.save(annotations / "00000.png")
    out = tmp_path / "masks"
    argv = [
        "--tracker",
        str(directory),
        "--frames",
        str(jpegs),
        "--prompt-mask",
        str(annotations / "00000.png"),
    ]
    assert track_cli([*argv, "--out", str(out), "--threads", "2"]) == 0
    assert "objects 1, 3" in capsys.readouterr().out

    images = [
        load_frame((jpegs / f"{t:05d}.jpg").read_bytes(), SIZE, VIDEO, "test").numpy() for t in range(4)
    ]
    prompts = {1: TrackPrompt(0, box=(30, 20, 90, 50)), 3: TrackPrompt(0, box=(10, 60, 40, 80))}
    want = OnnxVideoTracker(directory, threads=2).track(images, VIDEO, prompts)
    for t in range(4):
        written = np.array(Image.open(out / f"{t:05d}.png"))
        expected = np.where(want[3][t], 3, np.where(want[1][t], 1, 0))
        np.testing.assert_array_equal(written, expected)


def test_track_command_refuses_a_folder_without_a_tracker(tmp_path, capsys):
    argv = ["--tracker", str(tmp_path), "--frames", str(tmp_path), "--prompt-mask", "x.png", "--out", "o"]
    assert track_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no exported video tracker" in err and len(err.splitlines()) == 1


def test_frame_preparation_is_the_data_layers(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (*VIDEO, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "f.jpg")
    want = load_frame((tmp_path / "f.jpg").read_bytes(), SIZE, VIDEO, "test").numpy()
    np.testing.assert_array_equal(prepare_frame(tmp_path / "f.jpg", SIZE), want)


def test_numpy_helpers_compute_what_torch_computes():
    x = torch.randn(2, 1, 32, 32) * 20
    want = torch.nn.functional.interpolate(x, VIDEO, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(
        resize_bilinear(x.numpy(), VIDEO), want, rtol=0, atol=1e-5 * float(x.abs().max())
    )
    np.testing.assert_array_equal(to_bfloat16(x.numpy()), x.bfloat16().float().numpy())


@pytest.mark.parametrize("similarity", ["flat", "per_location"])
def test_numpy_bank_fuses_the_entries_the_torch_bank_fuses(similarity):
    generator = torch.Generator().manual_seed(0)
    torch_bank, bank = (
        TorchMemoryBank(3, k=2, similarity=similarity),
        MemoryBank(3, k=2, similarity=similarity),
    )
    for t in range(7):
        features = (torch.randn(1, 8, 4, 4, generator=generator) + t % 2).bfloat16()  # [1, C, h, w]
        torch_bank.add(MemoryEntry(features, features, (t,)))
        bank.add(features.float().flatten(2).permute(2, 0, 1).numpy(), (t,))  # tokens [hw, 1, C]
    assert [e.frames for e in bank.entries] == [e.frames for e in torch_bank.entries]
    for entry, torch_entry in zip(bank.entries, torch_bank.entries, strict=True):
        np.testing.assert_array_equal(
            entry.maskmem, torch_entry.features.float().flatten(2).permute(2, 0, 1).numpy()
        )


@pytest.mark.slow  # needs the exported tracker
def test_bad_tracker_options_are_refused(float_tracker):
    _, directory = float_tracker
    with pytest.raises(MQSAM2Error, match="memory policy"):
        OnnxVideoTracker(directory, policy="mutual-kv")
    with pytest.raises(MQSAM2Error, match="k <= capacity"):
        OnnxVideoTracker(directory, policy="sis", memory_options={"capacity": 1, "k": 2})


@pytest.mark.slow  # the tracker's graphs through torch.export, and the fake-quant tracker: about a minute
def test_quantized_tracker_keeps_every_code_and_follows_the_fake_quant_tracker(tmp_path):
    """A mixed 4-8-bit plan over every network of the tracker; every quantized layer's codes are read back from
    the graph that holds it. The masks follow the fake-quant tracker within float-rounding noise (a rounding
    difference that moves an activation across a rounding boundary moves it a whole step)."""
    frames, prompts = _clip()
    frames, prompts = frames[:4], {1: prompts[1]}
    model = build_sam2("t", image_size=SIZE)
    layers = quantizable_layers(model)
    quantize(model, QuantConfig(bits=8, plan={name: 4 + i % 5 for i, name in enumerate(layers)}))
    with calibration(model):
        model.track_clip(frames, VIDEO, prompts)
    export = export_video_tracker(model, tmp_path)
    float64_model = copy.deepcopy(model).double()  # the yardstick for float rounding
    assert {name.split(".")[0] for name in export.layers.kernels} >= {
        "image_encoder", "sam_mask_decoder", "memory_attention", "memory_encoder", "obj_ptr_proj", "obj_ptr_tpos_proj"
    }  # fmt: skip
    stored = {}
    for path in export.graphs.values():
        stored |= {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for name, kernel in export.layers.kernels.items():
        layer = model.get_submodule(name)
        codes = layer.weight_quantizer.codes(layer.weight).numpy().astype(np.int64)
        weights = stored[f"model.{name}.codes"].astype(np.int64)
        np.testing.assert_array_equal(weights.T if kernel == "qdq-int8" else weights, codes)

    for memory_frames, pointers in ((1, 1), (3, 12)):  # the dynamic memory and pointer lengths
        inputs = video_example_inputs(model, memory_frames, pointers)
        for role, graph, names in NETWORKS:
            want, float64 = (
                _first_output(graph(model), inputs, names),
                _first_output(graph(float64_model), inputs, names),
            )
            got = session(export.graphs[role], threads=2).run(None, {n: inputs[n].numpy() for n in names})[0]
            assert _relative_error(got, want) <= 2 * _relative_error(float64, want) + 1e-5, role

    want = model.track_clip(frames, VIDEO, prompts)[0]
    got = OnnxVideoTracker(tmp_path, threads=2).track(frames.numpy(), VIDEO, _track_prompts(prompts))[1]
    iou = region_similarity(torch.from_numpy(got), want)
    assert float(iou.mean()) >= 0.9, iou
