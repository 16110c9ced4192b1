"""The fit CLI: every shipped config parses, command-line values override the YAML, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqsam2.config import FitConfig
from mqsam2.fit import main, parse_config

CONFIGS = sorted(
    path
    for path in Path(__file__).parents[1].glob("configs/**/*.yaml")
    if "compare" not in path.parts  # grids of python -m mqsam2.compare, checked in test_compare
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_parses(path):
    config = parse_config(["--config", str(path)])
    assert isinstance(config, FitConfig)
    assert config.allocation.candidates and config.reconstruction.iters > 0


def test_command_line_overrides_yaml():
    config = parse_config(
        ["--config", "configs/demo.yaml", "--model.size", "b+", "--reconstruction.iters", "3"]
    )
    assert (config.model.size, config.reconstruction.iters, config.model.image_size) == ("b+", 3, 256)


def test_bad_config_value_is_a_one_line_error(capsys):
    assert (
        main(
            ["--config", "configs/demo.yaml", "--reconstruction.mode", "magic", "--run_root", "/nonexistent"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: reconstruction.mode: 'magic' is not one of qdrop, brecq, adaround, lsc, none "
        "(see python -m mqsam2.fit --help)"
    ]


def test_no_validation_data_is_made_or_read_when_evaluation_is_off(tmp_path):
    """A reconstruction-only run must not pay for a held-out set it never evaluates."""
    from mqsam2.pipeline import load_data

    config = parse_config(
        [
            "--config", "configs/demo.yaml", "--data.root", str(tmp_path), "--evaluation.enabled", "false",
            "--data.synth_videos", "1", "--data.synth_frames", "2", "--data.synth_size", "64",
            "--data.synth_images", "1", "--data.calib_videos", "1", "--data.calib_frames", "2",
            "--data.calib_images", "1",
        ]
    )  # fmt: skip
    datasets = load_data(config, image_size=64)
    assert datasets.val_videos == [] and datasets.val_images == []
    assert len(datasets.calibration.videos) == 1
    # synthetic sets are named by their settings; the held-out one uses seed + 1
    assert [p.name for p in tmp_path.iterdir()] == ["v1x2-s64-i1-seed0"]


def test_every_choice_field_lists_exactly_what_its_registry_accepts():
    """The parser's valid values (the Literal types) must not drift from the code that consumes them."""
    from typing import get_args, get_origin, get_type_hints

    from mqsam2.allocation import ACTIVATION_MODES, ERROR_MODELS, SOLVERS
    from mqsam2.config import (
        AllocationConfig,
        DataConfig,
        EvaluationConfig,
        RecipeConfig,
        ReconstructionConfig,
    )
    from mqsam2.evaluate import PromptKind
    from mqsam2.memory import MEMORY_POLICIES
    from mqsam2.quant.observers import OBSERVERS
    from mqsam2.quant.swap import QuantConfig
    from mqsam2.reconstruct.units import UNIT_MODES

    def choices(cls, name):
        hint = get_type_hints(cls)[name]
        return set(get_args(get_args(hint)[0] if get_origin(hint) is list else hint))

    assert choices(AllocationConfig, "method") == set(SOLVERS)
    assert choices(AllocationConfig, "error") == set(ERROR_MODELS)
    assert choices(ReconstructionConfig, "mode") == set(UNIT_MODES)
    assert choices(QuantConfig, "weight_observer") == choices(QuantConfig, "act_observer") == set(OBSERVERS)
    assert choices(DataConfig, "prompt") == set(get_args(PromptKind))
    assert choices(EvaluationConfig, "memory") == set(MEMORY_POLICIES)
    optional = get_args(get_type_hints(RecipeConfig)["activations"])  # (Literal[...], None)
    assert set(get_args(optional[0])) == set(ACTIVATION_MODES)
