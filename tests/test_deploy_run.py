"""`python -m mqsam2.deploy --run ... --target ...`: a run's export becomes the target's artefact with its
report and a deployment section in the model card; bad input is one line and exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml

from mqsam2.config import DataConfig, FitConfig, ModelConfig, config_dict
from mqsam2.deploy.__main__ import main as deploy_cli
from mqsam2.deploy.fidelity import torch_box_predictor
from mqsam2.deploy.onnx import OnnxImagePredictor, OnnxVideoTracker
from mqsam2.errors import MQSAM2Error
from mqsam2.export import export_model
from mqsam2.memory import Prompt
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantize
from tests.conftest import _moving_square_clip

SIZE = 128


def _run_dir(tmp_path, export: bool = True):
    """A run directory as fit leaves it, as far as deployment reads it: config.yaml and export/model.mq."""
    data = DataConfig(
        root=str(tmp_path / "data"), synth_videos=1, synth_frames=2, synth_size=64, synth_images=2,
        calib_videos=1, calib_frames=2, calib_images=2, val_videos=1, val_frames=2, val_images=1,
    )  # fmt: skip
    config = FitConfig(name="unit", model=ModelConfig(size="t", image_size=SIZE), data=data)
    run_dir = tmp_path / "unit"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict(config)))
    if export:
        frames, masks = _moving_square_clip(frames=2, size=SIZE)
        model = quantize(build_sam2("t", image_size=SIZE), QuantConfig(bits=8))
        with calibration(model):
            torch_box_predictor(model)(frames[0], [[20.0, 20.0, 90.0, 90.0]])
            model.track_clip(frames, (SIZE, SIZE), {1: Prompt.from_mask(0, masks[0])})
        export_model(model, run_dir / "export" / "model.mq")
    return run_dir


def test_a_run_without_an_export_is_refused_and_nothing_is_written(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, export=False)
    assert deploy_cli(["--run", str(run_dir), "--target", "onnx"]) == 2
    assert "has no export" in capsys.readouterr().err
    assert not (run_dir / "deploy").exists()


def test_unknown_target_is_refused():
    from mqsam2.deploy.run import DeployRunConfig

    with pytest.raises(MQSAM2Error, match="unknown target"):
        DeployRunConfig(target="tpu")


@pytest.mark.slow  # two SAM2 graphs through torch.export
def test_onnx_target_writes_the_artefact_the_report_and_the_card(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    argv = ["--run", str(run_dir), "--target", "onnx", "--threads", "1", "--repeats", "1", "--images", "1"]
    assert deploy_cli(argv) == 0
    out = run_dir / "deploy" / "onnx"
    report = json.loads((out / "report.json").read_text())
    assert report["layers"]["qdq-int8"] > 0
    assert report["size"]["ratio"] < 0.3
    assert report["fidelity"]["mask_iou_vs_fake_quant"]["iou_mean"] > 0.9
    assert OnnxImagePredictor(out).image_size == SIZE
    assert OnnxVideoTracker(out / "tracker").image_size == SIZE
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["deployment"]["onnx"]["mask_iou_vs_fake_quant"].endswith("min")
    assert "## Deployment" in (run_dir / "export" / "model_card.md").read_text()
    assert "encoder_s_per_image" in capsys.readouterr().out
