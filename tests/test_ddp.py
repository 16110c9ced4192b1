"""Reconstruction and evaluation under DDP on CPU (gloo, started by the fit CLI through torchrun) against one
process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

UNIT = "memory_attention.layers.0"


def _fit(tmp_path, devices: int, stages_from: str | None = None) -> dict:
    """A fit of one unit on `devices` CPU processes; `stages_from` (a run of the same config) lends its
    finished importance, plan and calibration, so only the reconstruction differs between the runs."""
    run_dir = tmp_path / f"ddp{devices}"
    if stages_from is not None:
        run_dir.mkdir()
        for name in ("config.yaml", "importance.json", "plan.json", "calibrated.pt"):
            shutil.copy(tmp_path / stages_from / name, run_dir / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    command = [
        sys.executable, "-m", "mqsam2.fit", "--config", "configs/demo.yaml",
        "--name", f"ddp{devices}", "--run_root", str(tmp_path),
        "--data.root", str(tmp_path / "data"),
        "--reconstruction.units", f"[{UNIT}]", "--reconstruction.iters", "40",
        "--reconstruction.batch_size", "2", "--reconstruction.devices", str(devices),
        "--evaluation.enabled", "false", "--export", "false",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((run_dir / "units.jsonl").read_text().splitlines()[0])
    state = torch.load(run_dir / "units" / UNIT / "qdrop.pt")
    return {"record": record, "state": state}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """Two ranks each hold one calibration clip and draw their own batches, so the runs see the same data but
    not the same batch sequence: the learned codes cannot be bit-identical. Measured here: 99.87 % of the
    hardened weights agree and the output errors after reconstruction are 15.53 and 15.69 (1 % apart; the
    2-process figure is measured on rank 0's clip). We require 97 % and 10 %: room for batch-order noise, while a
    2-process run that learned something else (lost data, a broken gradient average) drifts further."""
    one = _fit(tmp_path, 1)
    two = _fit(tmp_path, 2, stages_from="ddp1")
    assert (one["record"]["world_size"], two["record"]["world_size"]) == (1, 2)
    weights = [k for k in one["state"] if k.endswith(".weight") and one["state"][k].ndim >= 2]
    same = sum(torch.eq(one["state"][k], two["state"][k]).sum().item() for k in weights)
    total = sum(one["state"][k].numel() for k in weights)
    assert same / total > 0.97
    errors = one["record"]["error_after"], two["record"]["error_after"]
    assert abs(errors[0] - errors[1]) / errors[0] < 0.10, errors


def _evaluate(run_root, data_root, devices: int) -> dict:
    """metrics.json of a calibration-only fit on `devices` CPU processes: the tiny config of the Slurm test
    (SAM2.1-tiny at 64 px), evaluated on its one validation clip and one image."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    command = [
        sys.executable, "-m", "mqsam2.fit", "--config", "configs/slurm_ci.yaml",
        "--run_root", str(run_root), "--data.root", str(data_root),
        "--reconstruction.mode", "none", "--reconstruction.devices", str(devices),
        "--evaluation.enabled", "true", "--logging.wandb", "false", "--export", "false",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((run_root / "slurm-ci" / "metrics.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_evaluate_exactly_like_one_process(tmp_path):
    """One clip and one image on two ranks: rank 0 scores both while rank 1 only runs empty steps, then the
    metrics sync (validation loop and comparison table). Each item counted once, so the numbers equal one
    process's exactly; rank 0 draws the overlay without waiting on rank 1."""
    one = _evaluate(tmp_path / "one", tmp_path / "data", 1)
    two = _evaluate(tmp_path / "two", tmp_path / "data", 2)
    assert two == one
    assert {"val/J&F", "val/fidelity/J&F", "val/mAP", "val/fidelity/mAP"} <= one["validation"].keys()
    assert list((tmp_path / "two" / "slurm-ci" / "eval" / "overlays").glob("*.png"))
