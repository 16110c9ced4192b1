"""`python -m mqsam2.fit` with a `recipe` section: a registered method fitted as its own run gives the model
`mqsam2.api.quantize_sam2` makes for that recipe alone, exported and reloaded; bad recipes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mqsam2 import api
from mqsam2.export import load_export
from mqsam2.export.card import card_paths
from mqsam2.fit import main, parse_config
from mqsam2.methods import get_method
from mqsam2.pipeline import load_data, load_float_model
from mqsam2.quant import quantized_layers
from mqsam2.quant.observers import OBSERVERS, MSEObserver
from mqsam2.quant.quantizer import ActQuantizer
from mqsam2.rundir import RunDir

BASELINES = sorted(Path(__file__).parents[1].glob("configs/baselines/*.yaml"))


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.name)
def test_every_baseline_config_names_the_registered_method_and_width_of_its_file(path):
    width, method = path.stem.split("_", 1)  # w4a4_qdrop
    recipe = parse_config(["--config", str(path)]).recipe
    assert get_method(recipe.method).name == method and f"w{recipe.bits:g}a{recipe.bits:g}" == width


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--recipe.method", "qdorp", "error: recipe.method: unknown method 'qdorp': use one of adaround, "),
        ("--recipe.bits", "4.5", "error: recipe.bits 4.5: qdrop is uniform, give a whole width in 2..8"),
        ("--allocation.method", "greedy", "error: allocation.method is decided by recipe.method qdrop: "),
    ],
)
def test_a_bad_recipe_is_one_line_and_exit_status_2(option, value, error, capsys):
    argv = ["--config", "configs/baselines/w4a4_qdrop.yaml", option, value, "--run_root", "/nonexistent"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(error)


def test_a_mixed_recipe_outside_its_candidates_and_an_unexportable_method_are_refused(capsys):
    base = ["--config", "configs/demo.yaml", "--run_root", "/nonexistent"]
    assert main([*base, "--recipe.method", "mixqsam2", "--recipe.bits", "9"]) == 2
    assert main([*base, "--recipe.method", "ptq4sam", "--recipe.bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "recipe.bits 9 is not an average mixqsam2 can reach with candidates [8]" in err
    assert "ptq4sam makes a model the packed export cannot hold (docs/export.md): set export: false" in err


TOY = """
name: {name}
run_root: {root}/runs
model: {{size: t, image_size: 64}}
data: {{root: {root}/data, synth_videos: 1, synth_frames: 2, synth_size: 64, synth_images: 0, calib_videos: 1,
        calib_frames: 2, calib_images: 0, calib_objects: 1, val_videos: 1, val_frames: 2, val_images: 0}}
quant: {{observer_sample_size: 4096}}
recipe: {{method: {method}, bits: 4}}
reconstruction: {{iters: 1, batch_size: 1, accelerator: cpu, checkpoint_every: 1, units: [obj_ptr_proj]}}
evaluation: {{enabled: {evaluate}, memory: [fifo], baselines: [], images: false, overlays: 0}}
logging: {{wandb: false}}
"""


class CoarseMSE(MSEObserver):
    """OMSE over 4 candidate ranges instead of 100: the same search at a 25th of its CPU time (the full one
    takes over a minute per calibration of SAM2.1-t here), for the fit and the model it is checked against."""

    def __init__(self, **kwargs):
        super().__init__(steps=4, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "label"), [("minmax", "minmax W4A4"), ("qdrop", None), ("mixqsam2", None)]
)
def test_a_fitted_recipe_exports_the_model_quantize_sam2_makes_for_it(method, label, tmp_path, monkeypatch):
    """A uniform observer method, a reconstruction method and a mixed one, each fitted as a run of its own:
    the reloaded export and the run directory hold the weights and activation steps of the model the library
    makes alone; the evaluated run (one, for time) names its row in the table by method and width."""
    monkeypatch.setitem(OBSERVERS, "mse", CoarseMSE)
    path = tmp_path / "fit.yaml"
    path.write_text(TOY.format(name=method, root=tmp_path, method=method, evaluate=label is not None))
    assert main(["--config", str(path)]) == 0
    config = parse_config(["--config", str(path)])
    float_model = load_float_model(config)
    workload = load_data(config, float_model.image_size).calibration
    recipe = api.Recipe(method, 4, quant=config.quant, reconstruction=config.reconstruction)
    alone = api.quantize_sam2(float_model, workload, recipe, tmp_path / "alone").model
    run = RunDir.of(config)
    expected = quantized_layers(alone)
    steps = {n: (m.bits, float(m.scale)) for n, m in alone.named_modules() if isinstance(m, ActQuantizer)}
    for reloaded in (load_export(run.export), run.load_model()[0]):  # the file, and the run directory
        layers = quantized_layers(reloaded)
        assert layers.keys() == expected.keys()
        for name, layer in layers.items():
            assert layer.bits == expected[name].bits
            assert torch.equal(layer.quantized_weight(), expected[name].quantized_weight()), name
        acts = {
            n: (m.bits, float(m.scale)) for n, m in reloaded.named_modules() if isinstance(m, ActQuantizer)
        }
        assert acts == steps
    assert (run.path / "units" / "obj_ptr_proj").is_dir() == (method != "minmax")
    assert json.loads(card_paths(run.export)[1].read_text())["method"]["recipe"] == method
    if label is not None:
        rows = json.loads(run.metrics.read_text())["table"]
        assert [row["model"] for row in rows] == ["FP", f"{label} (W4.00/A4.00)"]
