"""Every GPU job script runs its CPU dry-run mode at toy size: the GPU call then runs code that passed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
GENERATOR = ROOT.parent / "shared" / "data" / "regime_clips.py"  # the trained model's clip generator


@pytest.mark.slow
@pytest.mark.skipif(not GENERATOR.exists(), reason="needs ../shared/data/regime_clips.py")
def test_grid_call_dry_run_makes_regime_shards_and_a_finished_grid(tmp_path):
    # the config's baseline (qdrop-w4a4) at round to nearest, and one learning row
    rows = "[{method: fp}, {method: qdrop, bits: 4, iters: 0}, {method: mixqsam2-propagated, bits: 4}]"
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "PY": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [
            "bash",
            "jobs/grid_call.sh",
            "dry",
            str(GENERATOR),
            "--rows",
            rows,
            "--quant.observer_sample_size",
            "4096",
            "--reconstruction.units",  # a Hiera block and a loop unit: both capture paths, a tenth of the steps
            "[image_encoder.trunk.blocks.11, memory_attention.layers.0]",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    grid = tmp_path / "out" / "grid"
    times = json.loads((grid / "grid.json").read_text())
    assert list(times["rows"]) == ["fp", "qdrop-w4a4", "mixqsam2-propagated-avg4"]
    assert times["rows"]["mixqsam2-propagated-avg4"]["iters"] == 2
    cell = json.loads((grid / "cells" / "qdrop-w4a4__fifo.json").read_text())
    assert cell["tracks"] >= 3 and len(cell["clips"]) == 3  # the three regime clips, every object scored
    assert cell["weights_mb"] > 0 and "units_worse" in cell
    # per row: the units' records; the mixed row also its plan and its sensitivity picture
    collected = {path.name.rsplit("_", 1)[-1] for path in (grid / "rows").iterdir()}
    assert collected == {"units.jsonl", "plan.json", "sensitivity.png"}
    assert len(list((grid / "rows").glob("mixqsam2-propagated-avg4-*_sensitivity.png"))) == 1


@pytest.mark.slow
def test_deploy_call_dry_run_measures_its_rows_at_toy_size(tmp_path):
    """jobs/deploy_call.sh's CPU mode: the GPU tests collect (and skip), benchmarks/inference.py prints its table
    and writes its JSON, with each row's phases, and the profiles come packed (this is also the inference
    benchmark's toy-size test)."""
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "jobs/deploy_call.sh", "dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads((tmp_path / "inference.json").read_text())
    rows = saved["rows"]
    assert saved["complete"] and [row["variant"] for row in rows] == ["bf16", "avg4"]
    assert "| avg4 |" in (tmp_path / "inference.log").read_text()  # the table the GPU call records
    assert not [row for row in rows if "error" in row]
    assert {"image", "video", "profile"} <= set(rows[1]["phase_s"]) and "source" in rows[1]["phase_s"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "bench-data",
        "gpu_tests.log",
        "inference.json",
        "inference.log",
        "profiles.tgz",
    ]


def test_inference_report_prints_the_recorded_gpu_rows():
    """`benchmarks/inference.py --report` renders saved rows (a cut-off call's, several calls' in one table)."""
    recorded = ROOT / "docs" / "gpu" / "deploy_2026-12-07" / "inference.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/inference.py", "--report", str(recorded)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    bf16, compiled = (line for line in done.stdout.splitlines() if line.startswith("| bf16"))
    assert bf16.startswith("| bf16 | bf16 autocast | 67.54 | 0.56x |")  # image rates against bf16+compile
    assert compiled.startswith("| bf16+compile | bf16 autocast | 120.12 | 1.00x |")
