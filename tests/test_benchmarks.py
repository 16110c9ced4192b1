"""Every benchmark script runs at toy size on the CPU and prints its table (smoke tests: no timing asserts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("allocation.py", ["--sizes", "t", "--repeats", "1"], "| SAM2.1-t | 169 |"),
        (
            "data.py",
            ["--videos", "2", "--frames", "2", "--size", "128", "--clips", "2", "--workers", "0"],
            "| 0 |",
        ),
        ("memory.py", ["--frames", "12", "--image-size", "64", "--memory-every", "4"], "sis+free"),
        (
            "reconstruction.py",
            [
                "--image-size",
                "64",
                "--units",
                "image_encoder.trunk.blocks.1",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--batch-size",
                "2",
                "--calib-videos",
                "1",
                "--calib-frames",
                "2",
                "--calib-images",
                "1",
            ],
            "fused vs old: capture",
        ),
        ("validation.py", ["--clips", "1", "--frames", "2", "--image-size", "64"], "| 1 | 0 |"),
        (
            "synth_regime.py",
            ["--image-size", "64", "--clips", "1", "--frames", "2", "--objects", "1-1"],
            "| 1-1 | 1 x 2 | 1 |",
        ),
        (
            "cost_model.py",
            [
                "--image-size",
                "64",
                "--calib-frames",
                "2",
                "--sample-frames",
                "2",
                "--layers",
                "trunk.blocks.0.,sam_mask_decoder.transformer.layers.0.",
            ],
            "| weights | all layers | 18 | 1.00 |",
        ),
    ],
    ids=["allocation", "data", "memory", "reconstruction", "validation", "synth_regime", "cost_model"],
)
def test_benchmark_runs_at_toy_size(script, args, expect, tmp_path):
    assert expect in _run(script, *args, tmp_path=tmp_path)


@pytest.mark.slow  # two small compare grids (float + QDrop row), one per engine variant
def test_grid_benchmark_prints_the_old_and_new_engine_side_by_side(tmp_path):
    out = _run(
        "grid.py",
        "--variants",
        "new,old",
        "--observer-sample-size",
        "4096",
        "--units",  # a Hiera block (captured once) and a loop unit (replayed: where the engines differ)
        "image_encoder.trunk.blocks.11",
        "memory_attention.layers.0",
        "--out",
        "bench",
        tmp_path=tmp_path,
    )
    rows = [
        line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "variant" not in line
    ]
    assert rows[-2:] == ["| new", "| old"]
    assert (tmp_path / "bench" / "bench.json").exists()


@pytest.mark.slow  # two SAM2 graphs through torch.export (the quantized exports: tests/test_deploy_onnx.py)
def test_edge_benchmark_runs_at_toy_size(tmp_path):
    args = ["--image-sizes", "128", "--variants", "fp32", "--repeats", "1", "--calib-images", "1"]
    args += ["--eval-images", "1", "--threads", "1"]
    assert "| 128 | fp32 |" in _run("edge.py", *args, tmp_path=tmp_path)
