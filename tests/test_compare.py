"""The compare grid: the paired bootstrap against exact enumeration, the per-clip aggregation against the
J&F definition, and the CLI's table, reuse of finished cells and errors on a toy grid."""

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mqsam2 import api
from mqsam2.compare import (
    ClipScore,
    CompareConfig,
    Grid,
    Row,
    aggregate,
    format_report,
    main,
    pack_masks,
    paired_bootstrap,
    parse_config,
    score_clips,
    units_made_worse,
    unpack_masks,
)
from mqsam2.config import DataConfig, ModelConfig, ReconstructionConfig, changed_identity
from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import track_all
from mqsam2.methods import get_method
from mqsam2.quant.swap import QuantConfig
from mqsam2.rundir import RunDir


def exact_bootstrap_distribution(num, den):
    """The paired difference over all n^n equally likely resamples of n clips, sorted."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    n = num.shape[1]
    deltas = []
    for draw in itertools.product(range(n), repeat=n):
        idx = list(draw)
        deltas.append(num[0, idx].sum() / den[0, idx].sum() - num[1, idx].sum() / den[1, idx].sum())
    return np.sort(deltas)


def test_paired_bootstrap_matches_exact_enumeration_on_a_hand_made_case():
    # Four clips, two rows; clip 3 is where row A loses. Tracks per clip differ (object-weighted mean).
    num = [[1.8, 0.9, 2.7, 0.2], [1.9, 0.95, 2.8, 0.9]]
    den = [[2, 1, 3, 1], [2, 1, 3, 1]]
    point, low, high = paired_bootstrap(num, den, samples=40_000, level=0.90, seed=3)
    assert point == pytest.approx((5.6 / 7) - (6.55 / 7))
    deltas = exact_bootstrap_distribution(num, den)
    cdf = lambda x: np.searchsorted(deltas, x, side="right") / len(deltas)  # noqa: E731
    # The 5 % and 95 % points of the exact distribution, within Monte Carlo error (~0.1 % at 40,000 draws).
    assert cdf(low) >= 0.04 and cdf(np.nextafter(low, -np.inf)) <= 0.06
    assert cdf(high) >= 0.94 and cdf(np.nextafter(high, -np.inf)) <= 0.96


def test_identical_rows_have_a_zero_width_interval():
    num = [[1.0, 0.5, 0.7], [1.0, 0.5, 0.7]]
    assert paired_bootstrap(num, [[1, 1, 1], [1, 1, 1]], samples=500) == (0.0, 0.0, 0.0)


def test_aggregate_averages_over_tracks_not_clips():
    scores = [ClipScore("a", 1, 1.0, 1.0, 1, 0.5, 0.5), ClipScore("b", 3, 0.0, 0.0, 3, 1.5, 1.5)]
    out = aggregate(scores)
    assert out["J&F"] == pytest.approx(0.25) and out["tracks"] == 4
    assert out["fidelity/J&F"] == pytest.approx(0.5)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/compare/*.yaml")), ids=str)
def test_every_shipped_grid_parses_and_names_registered_methods(path):
    config = parse_config(["--config", str(path)])
    assert all(get_method(row.method) for row in config.rows)


def test_rows_need_distinct_names_and_a_known_baseline():
    with pytest.raises(MQSAM2Error, match="appear twice"):
        CompareConfig(rows=[Row("minmax", 4), Row("minmax", 4)])
    with pytest.raises(MQSAM2Error, match="baseline 'qdrop-w4a4' is not a row"):
        CompareConfig(rows=[Row("minmax", 4)], baseline="qdrop-w4a4")
    assert Row("mixqsam2", 4).name == "mixqsam2-avg4" and Row("fp").name == "fp"
    assert Row("qsam2", 2, act_bits=4).name == "qsam2-w2a4" and Row("qsam2", 4).name == "qsam2-w4a4"


def test_a_row_reconstructs_under_its_own_precision_and_capture_and_keeps_its_own_folder(tmp_path):
    """Two engines on one row, side by side in one grid: the variant's recipe carries them, the plain row keeps
    the grid's, and the variant gets a folder of its own; a capture mode that does not exist is refused."""
    plain, fast = (
        Row("qdrop", 4),
        Row("qdrop", 4, precision="bf16-mixed", capture="shared", label="qdrop-fast"),
    )
    grid = Grid(CompareConfig(out_root=str(tmp_path), rows=[plain, fast], baseline="qdrop-w4a4"))
    assert (grid.recipe(fast).reconstruction.precision, grid.recipe(fast).reconstruction.capture) == (
        "bf16-mixed",
        "shared",
    )
    assert grid.recipe(plain).reconstruction == grid.config.reconstruction
    assert grid.row_key(fast) != grid.row_key(dataclasses.replace(fast, precision=None, capture=None))
    with pytest.raises(MQSAM2Error, match="capture 'batched' is unknown"):
        Row("qdrop", 4, capture="batched")


def test_the_table_marks_rows_that_spend_more_bits_than_the_baseline_on_either_axis():
    """The uniform baseline has 4.00/4.00 bits; a mixed row at 4.00/4.53 (the paper's shared-width reading) and
    the float row are marked as unequal budgets, a row at 3.99/4.00 is not; the size column shows the MB."""
    clips = [dataclasses.asdict(ClipScore(f"c{i}", 1, 0.5, 0.5, 1, 0.9 - 0.1 * i, 0.9)) for i in range(3)]

    def result(w, a):
        cell = {"fidelity/J&F": 0.85, "clips": clips, "weights_mb": 12.34}
        if w is not None:
            cell |= {"weight_avg_bits": w, "act_avg_bits": a}
        return {"cells": {"fifo": cell}}

    results = {
        "fp": result(None, None),
        "uniform": result(4.0, 4.0),
        "shared": result(4.0, 4.53),
        "separate": result(3.99, 4.0),
    }
    config = CompareConfig(rows=[Row("fp")], memory=["fifo"])
    config.baseline = "uniform"
    lines = {line.split(" | ")[0][2:]: line for line in format_report(results, config).splitlines()[2:6]}
    assert [row for row, line in lines.items() if "†" in line] == ["fp", "shared"]
    assert "| 12.3 |" in lines["separate"]
    assert format_report(results, config).endswith("not an equal-budget comparison.")


def test_a_row_with_its_own_baseline_is_compared_with_that_row():
    """The grid's baseline is uniform QDrop; a round-to-nearest mixed row names the uniform observer row as its
    own: its difference is to that row (identical clips: exactly zero), and the cell says so."""

    def result(fidelity):
        clips = [
            dataclasses.asdict(ClipScore(f"c{i}", 1, 0.5, 0.5, 1, fidelity + 0.01 * i, fidelity))
            for i in range(3)
        ]
        cell = {"fidelity/J&F": fidelity, "clips": clips, "weight_avg_bits": 4.0, "act_avg_bits": 4.0}
        return {"cells": {"fifo": cell}}

    rows = [
        Row("qdrop", 4, label="uniform"),
        Row("omse", 4, label="rtn"),
        Row("mixqsam2-propagated", 4, iters=0, label="mixed", baseline="rtn"),
    ]
    config = CompareConfig(rows=rows, memory=["fifo"], baseline="uniform")
    results = {"uniform": result(0.9), "rtn": result(0.7), "mixed": result(0.7)}
    lines = {line.split(" | ")[0][2:]: line for line in format_report(results, config).splitlines()[2:]}
    assert "+0.000 [+0.000, +0.000] vs rtn" in lines["mixed"]
    assert "-0.200" in lines["rtn"]
    with pytest.raises(MQSAM2Error, match="baseline 'nope' is not a row"):
        CompareConfig(rows=[Row("fp"), Row("omse", 4, baseline="nope")])


def test_units_made_worse_by_reconstruction_are_listed_worst_first(tmp_path):
    """Three finished units: one improved, one 1.5x worse, one 3x worse; a unit without a finished state is
    not counted."""
    run = RunDir(tmp_path)
    errors = {"a": (2.0, 1.0), "b": (1.0, 1.5), "c": (0.5, 1.5), "d": (1.0, 9.0)}
    for unit, (before, after) in errors.items():
        run.write_record(
            unit, "qdrop", {"unit": unit, "phase": "qdrop", "error_before": before, "error_after": after}
        )
        if unit != "d":
            torch.save({}, run.phase_state(unit, "qdrop"))
    run.write_unit_log([(u, "qdrop") for u in errors])
    assert [(w["unit"], w["after"] / w["before"]) for w in units_made_worse(run)] == [("c", 3.0), ("b", 1.5)]
    assert units_made_worse(RunDir(tmp_path / "none")) == []


def test_stored_results_are_keyed_by_changed_settings_only():
    """An option added later at its default, or an execution setting, must not invalidate finished cells."""
    assert changed_identity(ReconstructionConfig()) == {}
    changed = ReconstructionConfig(iters=5, cuda_graphs=False, cache_gb=1.0)
    assert changed_identity(changed) == {"iters": 5}
    hvq = changed_identity(
        ReconstructionConfig(hvq=dataclasses.replace(ReconstructionConfig().hvq, beta=0.25))
    )
    assert hvq == {"hvq": {"beta": 0.25}}


def test_packed_masks_round_trip_exactly():
    masks = (
        torch.rand(3, 5, 7, 11, generator=torch.Generator().manual_seed(0)) > 0.5
    )  # 1155 bits: not whole bytes
    packed = pack_masks(masks)
    assert packed["bits"].numel() == -(-masks.numel() // 8)
    assert torch.equal(unpack_masks(packed), masks)


@pytest.mark.slow
def test_toy_grid_writes_table_chart_per_clip_json_and_reuses_finished_cells(tmp_path, caplog):
    config = tmp_path / "grid.yaml"
    config.write_text(
        f"""
name: toy
out_root: {tmp_path}/out
model: {{size: t, image_size: 128}}
data: {{root: {tmp_path}/data, synth_videos: 2, synth_frames: 3, synth_size: 128, synth_images: 1,
        calib_videos: 1, calib_frames: 2, calib_images: 1, calib_objects: 1, val_videos: 2, val_frames: 3,
        val_images: 0}}
quant: {{observer_sample_size: 4096}}
reconstruction: {{iters: 2, batch_size: 2, accelerator: cpu, checkpoint_every: 2, units: [obj_ptr_proj]}}
memory: [fifo]
baseline: minmax-w4a4
gain_samples: [1, 1, 0]
images: false
rows:
  - {{method: fp}}
  - {{method: minmax, bits: 4}}
  - {{method: mixqsam2-propagated, bits: 4, iters: 2}}
"""
    )
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out" / "toy"
    table = (out / "table.md").read_text()
    assert "mixqsam2-propagated-avg4" in table and "Δ fidelity vs minmax-w4a4" in table
    assert (out / "table.png").stat().st_size > 0
    per_clip = json.loads((out / "per_clip.json").read_text())
    assert len(per_clip["minmax-w4a4/fifo"]) == 2
    cell = json.loads((out / "cells" / "mixqsam2-propagated-avg4__fifo.json").read_text())
    assert cell["weight_avg_bits"] <= 4 and cell["act_avg_bits"] <= 4
    assert (out / "cells" / "fp__fifo.json").exists()
    # where the time went: every row's seconds per stage, from its cells
    times = json.loads((out / "grid.json").read_text())
    assert set(times["rows"]) == {"fp", "minmax-w4a4", "mixqsam2-propagated-avg4"} and times["wall_s"] > 0
    learned = times["rows"]["mixqsam2-propagated-avg4"]
    assert learned["iters"] == 2 and min(learned[f"{s}_s"] for s in ("calibrate", "steps", "evaluate")) > 0
    assert times["rows"]["minmax-w4a4"]["steps_s"] == 0 and times["rows"]["fp"]["calibrate_s"] == 0
    assert [call["rows"] for call in times["calls"]] == [["fp", "minmax-w4a4", "mixqsam2-propagated-avg4"]]
    assert times["wall_s"] == times["calls"][0]["seconds"]
    caplog.clear()
    with caplog.at_level("INFO", logger="mqsam2"):
        assert main(["--config", str(config)]) == 0
    assert caplog.text.count("finished earlier") == 3
    # another grid with the same settings takes the finished cells and the importance instead of running them
    caplog.clear()
    with caplog.at_level("INFO", logger="mqsam2"):
        assert main(["--config", str(config), "--name", "toy2", "--reuse", f"[{out}]"]) == 0
    assert caplog.text.count("reused") == 3 and "float model under" not in caplog.text
    assert (tmp_path / "out" / "toy2" / "importance.key").read_text() == (out / "importance.key").read_text()
    assert (tmp_path / "out" / "toy2" / "table.md").read_text() == table
    # Parallel rows: two cells removed and recomputed in two processes, against the stored float masks
    first = {
        name: json.loads((out / "cells" / f"{name}__fifo.json").read_text()) for name in ("fp", "minmax-w4a4")
    }
    for name in first:
        (out / "cells" / f"{name}__fifo.json").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="mqsam2"):
        assert main(["--config", str(config), "--jobs", "2"]) == 0
    assert "2 rows to run in 2 processes" in caplog.text and "float model under" not in caplog.text
    for name, cell in first.items():
        again = json.loads((out / "cells" / f"{name}__fifo.json").read_text())
        # a row process uses its share of the cores, so sums may reassociate: equal to float tolerance
        assert [c.pop("clip") for c in again["clips"]] == [c.pop("clip") for c in cell["clips"]]
        assert again["clips"] == [pytest.approx(clip, rel=1e-3) for clip in cell["clips"]]
    # report_only writes the table from the stored cells and runs nothing: a missing row is left out
    (out / "cells" / "minmax-w4a4__fifo.json").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="mqsam2"):
        assert main(["--config", str(config), "--report_only", "true"]) == 0
    assert "minmax-w4a4: not run yet" in caplog.text
    # the grid's seconds add up over the calls that ran rows; a call with nothing to run adds none
    calls = json.loads((out / "grid.json").read_text())["calls"]
    assert len(calls) == 2 and sorted(calls[1]["rows"]) == ["fp", "minmax-w4a4"]
    assert not (out / "cells" / "minmax-w4a4__fifo.json").exists()
    table = (out / "table.md").read_text().splitlines()[2:]
    rows = [line.split(" | ")[0] for line in table if line.startswith("|")]
    assert rows == ["| fp", "| mixqsam2-propagated-avg4"]
    # A row that breaks is reported with its error, and the rows after it still run
    broken = Grid.model

    def model(self, row):
        if row.method == "minmax":
            raise RuntimeError("kernel missing")
        return broken(self, row)

    (out / "cells" / "fp__fifo.json").unlink()
    caplog.clear()
    with pytest.MonkeyPatch.context() as patch, caplog.at_level("INFO", logger="mqsam2"):
        patch.setattr(Grid, "model", model)
        assert main(["--config", str(config)]) == 0
    assert "row minmax-w4a4 failed: RuntimeError: kernel missing" in caplog.text
    assert (out / "cells" / "fp__fifo.json").exists()


@pytest.mark.slow
def test_a_row_made_from_the_grids_shared_artifacts_equals_the_row_made_alone(tmp_path):
    """The grid measures importance and tracks the float masks once for all rows; a row made from them must be
    the row `quantize_sam2` makes with nothing shared (its own importance pass), scored the same."""
    row = Row("mixqsam2", 4)
    config = CompareConfig(
        name="toy",
        out_root=str(tmp_path / "out"),
        model=ModelConfig(size="t", image_size=64),
        data=DataConfig(
            root=str(tmp_path / "data"),
            synth_videos=2,
            synth_frames=3,
            synth_size=64,
            synth_images=0,
            calib_videos=1,
            calib_frames=3,
            calib_images=0,
            val_videos=2,
            val_frames=3,
            val_images=0,
        ),
        quant=QuantConfig(observer_sample_size=4096),
        reconstruction=ReconstructionConfig(iters=2, accelerator="cpu", units=["obj_ptr_proj"]),
        memory=["fifo"],
        images=False,
        rows=[Row("fp"), row],
    )
    grid = Grid(config)
    grid.run()
    cell = json.loads((grid.dir / "cells" / f"{row.name}__fifo.json").read_text())
    alone = api.quantize_sam2(grid.float_model, grid.data.calibration, grid.recipe(row), tmp_path / "alone")
    _, shared_allocation, _ = grid.model(row)
    assert alone.allocation.plan == shared_allocation.plan
    clips = grid.data.val_videos
    float_masks = track_all(grid.float_model, clips, grid.prompts)
    scores = score_clips(track_all(alone.model, clips, grid.prompts), float_masks, clips, grid.prompts)
    assert aggregate(scores)["fidelity/J&F"] == pytest.approx(cell["fidelity/J&F"], abs=1e-12)
