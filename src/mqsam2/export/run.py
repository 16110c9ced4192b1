"""Rebuild the final quantized model of a finished fit run from its directory alone (no FP checkpoint needed):
the architecture from config.yaml, the plan from plan.json, calibrated.pt (every tensor of the calibrated
model), then each unit's finished phases in reconstruction order, as the driver wrote them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from mqsam2.allocation import read_plan
from mqsam2.config import FitConfig
from mqsam2.errors import MQSAM2Error
from mqsam2.models import build_architecture, config_name
from mqsam2.quant.swap import quantize
from mqsam2.reconstruct.driver import phases, unit_dir
from mqsam2.reconstruct.units import reconstruction_units


def read_run_config(run_dir: Path) -> FitConfig:
    from mqsam2.fit import parse_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MQSAM2Error(f"{run_dir} is not a fit run directory: {path.name} is missing")
    return parse_config(["--config", str(path)])


def load_run(run_dir: str | Path) -> tuple[nn.Module, FitConfig]:
    """The run's quantized video predictor, exactly as fit left it, and the run's config."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    resume = f"finish it with python -m mqsam2.fit --config {run_dir / 'config.yaml'}"
    for artifact in ("plan.json", "calibrated.pt"):
        if not (run_dir / artifact).is_file():
            raise MQSAM2Error(f"run {run_dir} has no {artifact} yet: {resume}")
    model = build_architecture(
        config_name(config.model.size, config.model.version), config.model.image_size, video=True
    )
    quantize(model, dataclasses.replace(config.quant, plan=read_plan(run_dir / "plan.json")))
    model.load_state_dict(torch.load(run_dir / "calibrated.pt", map_location="cpu", weights_only=True))
    for unit in reconstruction_units(model, config.reconstruction.mode):
        for phase in phases(config.reconstruction):
            done = unit_dir(run_dir, unit.name) / f"{phase.name}.pt"
            if not done.is_file():
                raise MQSAM2Error(
                    f"run {run_dir} is unfinished: unit {unit.name} has no {phase.name}.pt; {resume}"
                )
            unit.module.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
    return model, config


def run_export_path(run_dir: Path) -> Path:
    return Path(run_dir) / "export" / "model.mq"


def run_fp_bytes(config: FitConfig) -> int | None:
    """The size of the run's Meta checkpoint file, the natural FP reference (None for random-init runs)."""
    checkpoint = config.model.checkpoint
    return Path(checkpoint).stat().st_size if checkpoint and Path(checkpoint).is_file() else None
