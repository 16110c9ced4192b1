"""`python -m mqsam2.compare --config configs/compare/<name>.yaml`: a grid of methods x widths x memory policies
on one checkpoint and one calibration / validation set, the analogue of the paper's Tables 1-3.

Each row is a registered method (`mqsam2.methods`) at a width; each (row, memory policy) is a cell, scored per
clip against the labels (J, F, J&F) and against the float model's own masks under the same policy (fidelity),
plus COCO mask mAP per row when validation images are given. Cells are written as they finish under
`<out_root>/<name>/cells/` and reused on a rerun (a cell whose row or shared settings changed is recomputed);
quantized models are kept under `models/` and reconstruction resumes under `rows/<row>/`. The report is a
Markdown table with paired per-clip bootstrap intervals for each cell's fidelity difference to the baseline
row, per-clip JSON, and a PNG chart.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from matplotlib.figure import Figure

from mqsam2 import api
from mqsam2.allocation import ACTIVATION_MODES, MEASURED_ERRORS, Allocation
from mqsam2.cli import run_command
from mqsam2.config import (
    DataConfig,
    EvaluationConfig,
    FitConfig,
    ModelConfig,
    Precision,
    RecipeConfig,
    ReconstructionConfig,
    changed_identity,
    parse_arguments,
)
from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import clip_prompts, score_tracks, track_all
from mqsam2.files import save_torch, write_text
from mqsam2.importance import LayerImportance, read_importance, write_importance
from mqsam2.memory.policies import using_memory_policy
from mqsam2.methods import get_method
from mqsam2.metrics.coco import mask_map
from mqsam2.metrics.jandf import JandF
from mqsam2.quant import quantize, weight_megabytes
from mqsam2.quant.swap import QuantConfig
from mqsam2.reconstruct.capture import CAPTURE_MODES
from mqsam2.rundir import RunDir
from mqsam2.stages import StageTimes, collecting, stage, summary, synchronize

log = logging.getLogger("mqsam2")


@dataclass
class Row:
    """One method at one width: uniform WbAb (WbAa with `act_bits`), or Avg-b for mixed methods (candidates
    {b-1, b, b+1} unless given). `memory` and `iters` override the grid's policies and reconstruction
    iterations for this row; `iters: 0` stops a learning method after calibration (its round-to-nearest
    ablation); `activations` overrides a mixed method's activation mode (shared, fixed or separate);
    `low_bit_iters` the reconstruction's extra iterations for units with narrower layers; `precision` and
    `capture` its Trainer precision and capture mode (the same row under two engines, side by side on shared
    float artifacts); `baseline` the row this one's fidelity is compared with, instead of the grid's (e.g.
    round-to-nearest rows against the best uniform observer, learned rows against uniform QDrop)."""

    method: str
    bits: float = 4
    label: str | None = None
    candidates: list[int] | None = None
    memory: list[str] | None = None
    iters: int | None = None
    act_bits: int | None = None
    activations: str | None = None
    low_bit_iters: float | None = None
    precision: Precision | None = None
    capture: str | None = None
    baseline: str | None = None

    def __post_init__(self) -> None:
        if self.capture is not None and self.capture not in CAPTURE_MODES:
            raise MQSAM2Error(
                f"row {self.method}: capture {self.capture!r} is unknown: use one of {', '.join(CAPTURE_MODES)}"
            )
        if self.activations is not None:
            if self.activations not in ACTIVATION_MODES:
                raise MQSAM2Error(
                    f"row {self.method}: activations {self.activations!r} is not one of {', '.join(ACTIVATION_MODES)}"
                )
            if not get_method(self.method).mixed:
                raise MQSAM2Error(f"row {self.method}: activations applies to mixed methods only")

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        method = get_method(self.method)
        if not method.quantizes:
            return "fp"
        width = f"avg{self.bits:g}" if method.mixed else f"w{self.bits:g}a{self.act_bits or self.bits:g}"
        return f"{self.method}-{width}"


REPORT_ONLY_FIELDS = ("baseline",)  # Row fields that change the table, never a cell: not in a row's key


@dataclass
class BootstrapConfig:
    """Paired per-clip bootstrap of each cell's difference to the baseline row."""

    samples: int = 2000
    level: float = 0.95
    seed: int = 0


@dataclass
class CompareConfig:
    """The grid: one model and data set, shared quantizer and reconstruction settings, the rows."""

    name: str = "compare"
    out_root: str = "runs/compare"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    memory: list[str] = field(default_factory=lambda: ["fifo", "sis"])
    rows: list[Row] = field(
        default_factory=lambda: [Row("fp"), Row("minmax", 4), Row("mixqsam2-measured", 4)]
    )
    baseline: str | None = None
    images: bool = True
    detections: str | None = None
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    # Rows run in this many processes at once (after the float masks and importance are made once). Tracking a
    # small SAM2 is bound by Python and kernel launches, so on one GPU 3-4 processes finish a grid sooner.
    jobs: int = 1
    # (clips, frames, images) on which `propagated` rows measure each layer's downstream gain, `mask` rows its mask KL
    gain_samples: list[int] = field(default_factory=lambda: list(api.GAIN_SAMPLES))
    # Write the report from the cells stored so far and run nothing (rows not finished are left out)
    report_only: bool = False
    # Folders of other grids (or their committed copies) whose finished cells and importance are taken where
    # their settings' keys equal this grid's: a row finished in one grid is not run again in another
    reuse: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise MQSAM2Error(f"jobs must be at least 1, got {self.jobs}")
        if len(self.gain_samples) != 3 or min(self.gain_samples) < 0:
            raise MQSAM2Error(f"gain_samples must be [clips, frames, images] >= 0, got {self.gain_samples}")
        names = [row.name for row in self.rows]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MQSAM2Error(f"rows {', '.join(duplicates)} appear twice: give one of each a distinct label")
        for baseline in {self.baseline, *(row.baseline for row in self.rows)} - {None}:
            if baseline not in names:
                raise MQSAM2Error(f"baseline {baseline!r} is not a row: use one of {', '.join(names)}")


# ----------------------------------------------------------------------------------------------- scoring


@dataclass
class ClipScore:
    """Sums over one clip's tracks, so any set of clips averages over objects exactly as J&F does."""

    clip: str
    tracks: int
    j: float
    f: float
    fid_tracks: int = 0
    fid_j: float = 0.0
    fid_f: float = 0.0


def _sums(pred: torch.Tensor, target: torch.Tensor, clip, prompts, annotated_only: bool) -> tuple:
    metric = JandF().to(pred.device)
    score_tracks(metric, pred, target, clip, prompts, annotated_only)
    return int(metric.tracks), float(metric.j_sum), float(metric.f_sum)


def score_clips(preds: list, references: list | None, clips: list, prompts: list) -> list[ClipScore]:
    """Per-clip J/F sums against the labels and, given the float model's masks, against those."""
    scores = []
    for pred, clip, clip_prompts_, i in zip(preds, clips, prompts, range(len(clips)), strict=True):
        tracks, j, f = _sums(pred, clip.masks, clip, clip_prompts_, annotated_only=True)
        score = ClipScore(clip.video_id, tracks, j, f)
        if references is not None:
            score.fid_tracks, score.fid_j, score.fid_f = _sums(
                pred, references[i], clip, clip_prompts_, annotated_only=False
            )
        scores.append(score)
    return scores


def aggregate(scores: list[ClipScore]) -> dict[str, float]:
    """J, F, J&F over all tracks (labels) and fidelity J, F, J&F over all tracks (float masks)."""
    out = {}
    tracks = sum(s.tracks for s in scores)
    if tracks:
        j, f = sum(s.j for s in scores) / tracks, sum(s.f for s in scores) / tracks
        out |= {"J": j, "F": f, "J&F": (j + f) / 2, "tracks": tracks}
    fid_tracks = sum(s.fid_tracks for s in scores)
    if fid_tracks:
        j, f = sum(s.fid_j for s in scores) / fid_tracks, sum(s.fid_f for s in scores) / fid_tracks
        out |= {"fidelity/J": j, "fidelity/F": f, "fidelity/J&F": (j + f) / 2}
    return out


def paired_bootstrap(
    numerators: np.ndarray,
    denominators: np.ndarray,
    samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(difference, low, high): the ratio statistic `sum(num) / sum(den)` of row A minus row B, resampling clips
    with replacement and the same clips for both rows (paired). `numerators` and `denominators` are [2, clips]
    (row A, row B); the interval is the percentile interval of the resampled differences."""
    numerators, denominators = np.asarray(numerators, float), np.asarray(denominators, float)
    clips = numerators.shape[1]
    point = numerators[0].sum() / denominators[0].sum() - numerators[1].sum() / denominators[1].sum()
    counts = np.random.default_rng(seed).multinomial(clips, np.full(clips, 1.0 / clips), size=samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (counts @ numerators.T) / (counts @ denominators.T)
    deltas = stats[:, 0] - stats[:, 1]
    deltas = deltas[np.isfinite(deltas)]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return float(point), float(low), float(high)


def fidelity_difference(a: list[ClipScore], b: list[ClipScore], config: BootstrapConfig) -> tuple[float, ...]:
    """Fidelity J&F of cell a minus cell b with its paired bootstrap interval (clips matched by id)."""
    by_clip = {s.clip: s for s in b}
    pairs = [(s, by_clip[s.clip]) for s in a if s.clip in by_clip]
    numerators = np.array(
        [[(x.fid_j + x.fid_f) / 2 for x, _ in pairs], [(y.fid_j + y.fid_f) / 2 for _, y in pairs]]
    )
    denominators = np.array([[x.fid_tracks for x, _ in pairs], [y.fid_tracks for _, y in pairs]])
    return paired_bootstrap(numerators, denominators, config.samples, config.level, config.seed)


# ------------------------------------------------------------------------------------------------- cells


def _write_json(path: Path, payload) -> None:
    write_text(path, json.dumps(payload, indent=1) + "\n")


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Grid:
    """Owns the compare directory: models, cells and report; everything reusable is reused."""

    def __init__(self, config: CompareConfig):
        self.config = config
        self.dir = Path(config.out_root) / config.name
        # what the results depend on, left out what is at its default: keys survive options added later
        shared = {
            k: changed_identity(getattr(config, k)) for k in ("model", "data", "quant", "reconstruction")
        }
        shared["seed"] = config.seed
        self.shared = shared
        self.float_model: torch.nn.Module | None = None
        self.data = None
        self.references: dict[str, list] = {}
        self.reference_seconds: dict[str, float] = {}  # tracking the float masks, per policy (this process)
        self.importance: dict[str, LayerImportance] | None = None

    def row_key(self, row: Row) -> str:
        """The row's settings that differ from a Row's defaults (an option added later at its default keeps
        finished rows), less those only the report reads, and the grid's shared settings."""
        defaults = {f.name: f.default for f in dataclasses.fields(Row)}
        settings = {
            k: v
            for k, v in asdict(row).items()
            if k not in REPORT_ONLY_FIELDS and (k not in defaults or v != defaults[k])
        }
        return _key({"row": settings, "shared": self.shared})

    def cell_path(self, row: Row, policy: str) -> Path:
        return self.dir / "cells" / f"{row.name}__{policy}.json"

    def images_path(self, row: Row) -> Path:
        return self.dir / "cells" / f"{row.name}__images.json"

    def policies(self, row: Row) -> list[str]:
        return row.memory or self.config.memory

    def load_cell(self, path: Path, key: str, quiet: bool = False) -> dict | None:
        if not path.exists():
            return None
        cell = json.loads(path.read_text())
        if cell.get("key") != key:
            if not quiet:
                log.info("  %s: settings changed since it was scored, recomputing", path.name)
            return None
        return cell

    # --------------------------------------------------------------------------------------- shared inputs

    def fit_config(self) -> FitConfig:
        c = self.config
        return FitConfig(
            name=c.name,
            seed=c.seed,
            model=c.model,
            data=c.data,
            quant=c.quant,
            reconstruction=c.reconstruction,
            evaluation=EvaluationConfig(enabled=True, images=c.images, detections=c.detections),
        )

    def prepare(self) -> None:
        if self.float_model is not None:
            return
        from mqsam2 import pipeline

        fit = self.fit_config()
        self.float_model = pipeline.load_float_model(fit)
        self.data = pipeline.load_data(fit, self.float_model.image_size)
        if not self.data.val_videos:
            raise MQSAM2Error("compare needs validation clips: set data.val_video_shards (or synthetic data)")
        self.prompts = [clip_prompts(clip, self.config.data.prompt) for clip in self.data.val_videos]

    def track_all(self, model: torch.nn.Module, policy: str) -> list:
        """Every validation clip's masks under `policy`, on the model's device."""
        with using_memory_policy(model, policy):
            return track_all(model, self.data.val_videos, self.prompts)

    def reference(self, policy: str) -> list:
        """The float model's masks under `policy`, tracked once per grid and kept on disk (bit-packed)."""
        if policy not in self.references:
            path = self.dir / "references" / f"{policy}.pt"
            shared = self.shared
            key = _key(
                {"model": shared["model"], "data": shared["data"], "seed": shared["seed"], "policy": policy}
            )
            stored = torch.load(path, weights_only=True) if path.exists() else None
            if stored is not None and stored["key"] == key:
                self.references[policy] = [
                    unpack_masks(packed).to(self.float_model.device) for packed in stored["masks"]
                ]
            else:
                log.info("  float model under %s: tracking %d clips", policy, len(self.data.val_videos))
                start = time.perf_counter()
                masks = self.track_all(self.float_model, policy)
                synchronize()
                self.reference_seconds[policy] = time.perf_counter() - start
                save_torch({"key": key, "masks": [pack_masks(m.cpu()) for m in masks]}, path)
                self.references[policy] = masks
        return self.references[policy]

    def measured_widths(self, errors: Sequence[str] = MEASURED_ERRORS) -> list[int]:
        """Every candidate width of the rows whose error model is one of `errors`."""
        widths = set()
        for row in self.config.rows:
            if get_method(row.method).error in errors:
                widths.update(self.recipe(row).candidate_widths())
        return sorted(widths)

    def samples_for(self, error: str) -> list[int] | None:
        """The grid's gain samples when a row's error model measures on them (`propagated`, `mask`)."""
        needed = any(get_method(row.method).error == error for row in self.config.rows)
        return self.config.gain_samples if needed else None

    def importance_key(self) -> str:
        key = {
            "shared": self.shared,
            "widths": self.measured_widths(),
            "gains": self.samples_for("propagated"),
        }
        masks = self.samples_for("mask")
        return _key(key | {"masks": masks, "mask_widths": self.measured_widths(["mask"])} if masks else key)

    def shared_importance(self) -> dict[str, LayerImportance]:
        """Importance (with the measured tables for every width any row needs, and the downstream gains when a
        row needs them), once per grid."""
        if self.importance is None:
            path = self.dir / "importance.json"
            key_path = self.dir / "importance.key"
            widths = self.measured_widths()
            key = self.importance_key()
            if path.exists() and key_path.exists() and key_path.read_text() == key:
                self.importance = read_importance(path)
            else:
                start = time.perf_counter()
                self.importance = api.measure_importance(
                    self.float_model,
                    self.data.calibration,
                    self.config.quant,
                    widths,
                    self.samples_for("propagated"),
                    self.samples_for("mask"),
                    self.measured_widths(["mask"]),
                )
                write_importance(self.importance, path)
                write_text(key_path, key)
                log.info("importance: %d layers in %.1f s", len(self.importance), time.perf_counter() - start)
        return self.importance

    # ---------------------------------------------------------------------------------------------- models

    def recipe(self, row: Row) -> api.Recipe:
        """The row's recipe (`api.recipe_of`, as a fit's `recipe` section reads), on the grid's reconstruction
        with the row's own precision, capture and low-bit iterations."""
        overrides = {"low_bit_iters": row.low_bit_iters, "precision": row.precision, "capture": row.capture}
        rec = dataclasses.replace(
            self.config.reconstruction, **{k: v for k, v in overrides.items() if v is not None}
        )
        section = RecipeConfig(row.method, row.bits, row.candidates, row.act_bits, row.activations, row.iters)
        return api.recipe_of(section, self.config.quant, rec, self.config.seed)

    def row_dir(self, row: Row) -> Path:
        """The row's run folder, named by its settings' key, so changed settings start afresh."""
        return self.dir / "rows" / f"{row.name}-{self.row_key(row)}"

    def model(self, row: Row) -> tuple[torch.nn.Module, Allocation | None, StageTimes]:
        """The row's model: the float one, a saved quantized one, or quantized now (and saved), with the seconds
        its making took per stage (kept with a saved model, so a resumed grid still reports them)."""
        if not get_method(row.method).quantizes:
            return self.float_model, None, StageTimes()
        recipe = self.recipe(row)
        state_path = self.dir / "models" / f"{row.name}.pt"
        key = self.row_key(row)
        if state_path.exists():
            saved = torch.load(state_path, map_location="cpu", weights_only=False)
            if saved["key"] == key:
                allocation = (
                    Allocation(**saved["allocation"])
                    if "allocation" in saved
                    else api.allocate_bits(self.shared_importance(), recipe)
                )
                config = api.quant_config(recipe, allocation)
                model = copy.deepcopy(self.float_model)
                quantize(model, config)
                for name in saved["float_layers"]:
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, model.get_submodule(name).to_float())
                model.load_state_dict(saved["state"])
                log.info("  %s: reusing %s", row.name, state_path)
                return model, allocation, StageTimes(**saved.get("times", {}))
        start = time.perf_counter()
        with collecting() as times:
            result = api.quantize_sam2(
                self.float_model,
                self.data.calibration,
                recipe,
                self.row_dir(row),  # changed settings start afresh
                self.shared_importance(),
            )
        log.info("  %s: quantized in %.1f s (%s)", row.name, time.perf_counter() - start, summary(times))
        if get_method(row.method).act_observer != "dynamic":
            from mqsam2.quant.swap import quantizable_layers, quantized_layers

            # layers back in floating point (calibration never reached them), named among all that
            # `quantize` swaps, whether the plan names them or not
            swapped = quantizable_layers(
                self.float_model, api.quant_config(recipe, result.allocation).keep_fp
            )
            kept = sorted(set(swapped) - set(quantized_layers(result.model)))
            saved = {"key": key, "state": result.model.state_dict(), "float_layers": kept}
            saved |= {"allocation": dataclasses.asdict(result.allocation), "times": dataclasses.asdict(times)}
            save_torch(saved, state_path)
        return result.model, result.allocation, times

    # ----------------------------------------------------------------------------------------------- run

    def run(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "config.json", {"rows": [asdict(r) for r in self.config.rows], **self.shared})
        self.take_reusable()
        pending = [index for index, row in enumerate(self.config.rows) if not self.finished(row)]
        failed: dict[str, str] = {}
        clock = CallClock(self.dir / "calls.json")
        if self.config.report_only:
            failed = {self.config.rows[index].name: "not run yet" for index in pending}
        elif pending:
            with clock.running():
                failed = self.run_pending(pending, clock)
        results = {
            row.name: self.run_row(index)
            for index, row in enumerate(self.config.rows)
            if row.name not in failed
        }
        report = self.report(results)
        _write_json(self.dir / "grid.json", grid_times(results, clock.records))
        log.info("compare: %s\n%s", self.dir / "table.md", report)
        if failed:
            lines = "\n".join(f"  {name}: {error}" for name, error in failed.items())
            log.warning("%d rows left out of the report:\n%s", len(failed), lines)
        return results

    def take_reusable(self) -> None:
        """Copy in the cells (and the importance) that a `reuse` folder finished under the same keys."""
        for folder in map(Path, self.config.reuse):
            if not folder.is_dir():
                raise MQSAM2Error(f"reuse folder {folder} does not exist: name a grid's folder, or drop it")
            for row in self.config.rows:
                key = self.row_key(row)
                for path in (*(self.cell_path(row, p) for p in self.policies(row)), self.images_path(row)):
                    theirs = folder / "cells" / path.name
                    if not path.exists() and theirs.exists() and self.load_cell(theirs, key, quiet=True):
                        write_text(path, theirs.read_text())
                        log.info("  %s: finished in %s, reused", path.name, folder)
            key, theirs = self.dir / "importance.key", folder / "importance.key"
            if not key.exists() and theirs.exists() and theirs.read_text() == self.importance_key():
                write_text(self.dir / "importance.json", (folder / "importance.json").read_text())
                write_text(key, theirs.read_text())

    def run_pending(self, pending: list[int], clock: CallClock) -> dict[str, str]:
        """Run the unfinished rows (in `jobs` processes when asked); the failed ones with their errors."""
        if self.config.jobs > 1 and len(pending) > 1:
            self.prepare_shared(pending)
            jobs = min(self.config.jobs, len(pending))
            log.info("%d rows to run in %d processes", len(pending), jobs)
            with get_context("spawn").Pool(jobs, _worker_start, (self.config,)) as pool:
                outcomes = pool.imap_unordered(_worker_row, pending)
                return {name: error for name, error in self._logged(outcomes, clock) if error}
        outcomes = ((self.config.rows[index].name, self.try_row(index)) for index in pending)
        return {name: error for name, error in self._logged(outcomes, clock) if error}

    @staticmethod
    def _logged(outcomes, clock: CallClock):
        for name, error in outcomes:
            if error:
                log.error("row %s failed: %s", name, error)
            else:
                log.info("row %s finished", name)
                clock.finished(name)
            yield name, error

    def stored_cells(self, row: Row) -> tuple[dict, dict | None, bool]:
        """The row's finished cells (None where a cell is still to run), its image cell, and whether the image
        cell is still to run."""
        key = self.row_key(row)
        cells = {p: self.load_cell(self.cell_path(row, p), key) for p in self.policies(row)}
        images = self.load_cell(self.images_path(row), key) if self.config.images else None
        return cells, images, bool(self.config.images and images is None)

    def finished(self, row: Row) -> bool:
        cells, _, needs_images = self.stored_cells(row)
        return all(cells.values()) and not needs_images

    def prepare_shared(self, pending: list[int]) -> None:
        """What parallel rows share, made once before they start: the float masks under every policy the
        pending rows use, and the importance measurements."""
        self.prepare()
        rows = [self.config.rows[index] for index in pending]
        for policy in sorted({p for row in rows for p in self.policies(row)}):
            self.reference(policy)
        methods = [get_method(row.method) for row in rows]
        if any(method.quantizes and method.allocator is None for method in methods):
            self.shared_importance()

    def run_row(self, index: int) -> dict:
        """Row `index`'s cells and image cell: stored ones loaded, missing ones computed now."""
        row = self.config.rows[index]
        cells, images, needs_images = self.stored_cells(row)
        position = f"row {index + 1}/{len(self.config.rows)} {row.name}"
        if all(cells.values()) and not needs_images:
            log.info("%s: finished earlier", position)
            return {"cells": cells, "images": images}
        log.info(position)
        self.prepare()
        key = self.row_key(row)
        model, allocation, times = self.model(row)
        info = self.row_info(row, model, allocation)
        for policy, cell in cells.items():
            if cell is None:
                cells[policy] = self.score_cell(row, model, policy, key, info, times)
        if needs_images and self.data.val_images:
            images = self.score_images(row, model, key)
        return {"cells": cells, "images": images}

    def try_row(self, index: int) -> str | None:
        """Run row `index`, returning its error instead of raising: one broken method must not cost the rest
        of the grid."""
        try:
            self.run_row(index)
        except MQSAM2Error:
            raise
        except Exception as error:
            log.exception("row %s failed", self.config.rows[index].name)
            return f"{type(error).__name__}: {error}"
        return None

    def row_info(self, row: Row, model: torch.nn.Module, allocation: Allocation | None) -> dict:
        """What a cell says about its row: method, budget on both axes, stored size, iterations."""
        method = get_method(row.method)
        info = {"row": row.name, "method": row.method, "bits": row.bits, "summary": method.summary}
        info["weights_mb"] = round(weight_megabytes(model), 3)
        worse = units_made_worse(RunDir(self.row_dir(row)))
        if worse:
            log.warning(
                "  %s: reconstruction left %d unit(s) with a larger output error than round to nearest: %s",
                row.name,
                len(worse),
                ", ".join(f"{w['unit']} ({w['before']:.3g} -> {w['after']:.3g})" for w in worse),
            )
        info["units_worse"] = worse
        if allocation is not None:
            info |= {
                "weight_avg_bits": allocation.average_bits,
                "act_avg_bits": allocation.act_average_bits,
                "iters": self.recipe(row).reconstruction.iters
                if method.reconstruction != "none" and row.iters != 0
                else 0,
            }
        return info

    def score_cell(
        self, row: Row, model: torch.nn.Module, policy: str, key: str, info: dict, made: StageTimes
    ) -> dict:
        """Track and score the validation clips; the cell reports the row's seconds per stage (`made`: making
        the model) with this evaluation's (the float row's is the tracking of the reference masks)."""
        start = time.perf_counter()
        with collecting() as times:
            references = self.reference(policy)
            with stage("evaluate"):
                preds = references if model is self.float_model else self.track_all(model, policy)
                scores = score_clips(preds, references, self.data.val_videos, self.prompts)
        if model is self.float_model:
            times.add({"evaluate": self.reference_seconds.get(policy, 0.0)})
        times.add(made.seconds)
        times.gpu_peak_gib = max(
            (t for t in (times.gpu_peak_gib, made.gpu_peak_gib) if t is not None), default=None
        )
        cell = {
            "key": key,
            **info,
            "memory": policy,
            **aggregate(scores),
            "clips": [asdict(s) for s in scores],
            "seconds": round(time.perf_counter() - start, 1),
            "times": times.report(),
        }
        _write_json(self.cell_path(row, policy), cell)
        log.info(
            "  %s / %s: J&F %.4f, fidelity %.4f (%.0f s)",
            row.name,
            policy,
            cell.get("J&F", float("nan")),
            cell.get("fidelity/J&F", float("nan")),
            cell["seconds"],
        )
        return cell

    def score_images(self, row: Row, model: torch.nn.Module, key: str) -> dict:
        images, dets = self.data.val_images, self.config.detections
        cell = {"key": key, "mAP": mask_map(model, images, dets)["mAP"]}
        cell["fidelity/mAP"] = mask_map(model, images, dets, reference=self.float_model)["mAP"]
        _write_json(self.images_path(row), cell)
        return cell

    # ---------------------------------------------------------------------------------------------- report

    def report(self, results: dict) -> str:
        table = format_report(results, self.config)
        write_text(self.dir / "table.md", table + "\n")
        _write_json(
            self.dir / "per_clip.json",
            {f"{row}/{p}": cell["clips"] for row, r in results.items() for p, cell in r["cells"].items()},
        )
        plot_report(results, self.config, self.dir / "table.png")
        return table


def units_made_worse(run: RunDir) -> list[dict]:
    """The units whose reconstruction ended with a larger output error than their round-to-nearest start (the
    row's units.jsonl), worst first: where a row's learning failed, e.g. a layer given too few bits."""
    worse = [
        {"unit": r["unit"], "phase": r["phase"], "before": r["error_before"], "after": r["error_after"]}
        for r in run.unit_records()
        if r.get("error_after") is not None and r["error_after"] > r["error_before"]
    ]
    return sorted(worse, key=lambda w: w["before"] / w["after"] if w["after"] else 0.0)


class CallClock:
    """The wall-clock seconds of every call that worked on the grid, kept in `path` after each finished row, so a
    call stopped by its time limit still counts up to its last row, and a grid finished over several calls
    reports its whole time (a report-only call adds nothing)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = json.loads(path.read_text()) if path.exists() else []
        self.began = 0.0

    @contextmanager
    def running(self) -> Iterator[None]:
        """One call's rows: its record is stamped when they end, also when SIGTERM stops them."""
        self.began = time.perf_counter()
        self.records.append({"seconds": 0.0, "rows": []})
        try:
            yield
        finally:
            self._stamp()

    def finished(self, row: str) -> None:
        self.records[-1]["rows"].append(row)
        self._stamp()

    def _stamp(self) -> None:
        self.records[-1]["seconds"] = round(time.perf_counter() - self.began, 1)
        _write_json(self.path, self.records)


def grid_times(results: dict, calls: list[dict]) -> dict:
    """Where the grid's time went: the device, the wall-clock seconds of the calls that ran its rows (each
    call's seconds and the rows it finished under `calls`), and per row its iterations and seconds per stage
    (evaluation summed over the row's memory policies), from the cells."""
    rows = {}
    for name, result in results.items():
        cells = [cell for cell in result["cells"].values() if cell and "times" in cell]
        if not cells:
            continue
        times = dict(cells[0]["times"])
        times["evaluate_s"] = round(sum(cell["times"]["evaluate_s"] for cell in cells), 2)
        rows[name] = {"iters": cells[0].get("iters", 0), **times}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    wall_s = round(sum(call["seconds"] for call in calls), 1)
    return {"device": device, "wall_s": wall_s, "calls": calls, "rows": rows}


def pack_masks(masks: torch.Tensor) -> dict:
    """Bool masks as bits (an eighth of the bytes) with their shape."""
    return {"shape": list(masks.shape), "bits": torch.from_numpy(np.packbits(masks.numpy().reshape(-1)))}


def unpack_masks(packed: dict) -> torch.Tensor:
    count = math.prod(packed["shape"])
    bits = np.unpackbits(packed["bits"].numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(packed["shape"])


_worker_grid: Grid | None = None


def _worker_start(config: CompareConfig) -> None:
    """A row process: its own grid over the same directory; the parent owns stopping (it ends the pool)."""
    global _worker_grid
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.jobs))  # the processes share the cores
    _log_progress("mqsam2[%(process)d]")
    _worker_grid = Grid(config)


def _worker_row(index: int) -> tuple[str, str | None]:
    return _worker_grid.config.rows[index].name, _worker_grid.try_row(index)


# a row that spends more than this many bits above the baseline on either axis is not compared like for like
_BUDGET_TOLERANCE = 0.005
UNEQUAL_MARK = "†"
UNEQUAL_NOTE = (
    f"{UNEQUAL_MARK} the row spends more bits than the baseline on weights or activations: "
    "not an equal-budget comparison."
)


def over_budget(cell: dict, base: dict) -> bool:
    """Whether `cell`'s row has more average weight or activation bits than the baseline's (a float row,
    without averages, is never compared at equal bits)."""
    for axis in ("weight_avg_bits", "act_avg_bits"):
        if cell.get(axis) is None or base.get(axis) is None:
            return True
        if cell[axis] > base[axis] + _BUDGET_TOLERANCE:
            return True
    return False


def _difference_cell(results: dict, row: str, policy: str, config: CompareConfig) -> str:
    own = next((r.baseline for r in config.rows if r.name == row and r.baseline), None)
    baseline = own or config.baseline
    if baseline is None or row == baseline or baseline not in results:
        return "-"
    base_cells = results[baseline]["cells"]
    base = base_cells.get(policy) or next(iter(base_cells.values()))
    cell = results[row]["cells"][policy]
    if "fidelity/J&F" not in cell or "fidelity/J&F" not in base:
        return "-"
    diff, low, high = fidelity_difference(
        [ClipScore(**c) for c in cell["clips"]], [ClipScore(**c) for c in base["clips"]], config.bootstrap
    )
    mark = f" {UNEQUAL_MARK}" if over_budget(cell, base) else ""
    versus = f" vs {own}" if own and own != config.baseline else ""
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]{versus}{mark}"


def format_report(results: dict, config: CompareConfig) -> str:
    """The Markdown table: one line per cell, fidelity differences to the baseline with bootstrap intervals."""
    level = f"{config.bootstrap.level:.0%}"
    header = [
        "row",
        "memory",
        "W bits",
        "A bits",
        "MB",
        "iters",
        "units worse",
        "J",
        "F",
        "J&F",
        "fidelity J&F",
        f"Δ fidelity vs {config.baseline or '-'} ({level} CI)",
        "mAP",
        "fidelity mAP",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    for row, result in results.items():
        images = result.get("images") or {}
        for policy, cell in result["cells"].items():
            lines.append(
                "| "
                + " | ".join(
                    [
                        row,
                        policy,
                        fmt(cell.get("weight_avg_bits"), ".2f"),
                        fmt(cell.get("act_avg_bits"), ".2f"),
                        fmt(cell.get("weights_mb"), ".1f"),
                        str(cell.get("iters", "-")),
                        str(len(cell["units_worse"])) if "units_worse" in cell else "-",
                        fmt(cell.get("J")),
                        fmt(cell.get("F")),
                        fmt(cell.get("J&F")),
                        fmt(cell.get("fidelity/J&F")),
                        _difference_cell(results, row, policy, config),
                        fmt(images.get("mAP")),
                        fmt(images.get("fidelity/mAP")),
                    ]
                )
                + " |"
            )
    if any(UNEQUAL_MARK in line for line in lines[2:]):
        lines += ["", UNEQUAL_NOTE]
    return "\n".join(lines)


def plot_report(results: dict, config: CompareConfig, path: Path) -> Path:
    """Fidelity J&F (and J&F against labels) per cell as horizontal bars."""
    labels, fidelity, accuracy = [], [], []
    for row, result in results.items():
        for policy, cell in result["cells"].items():
            labels.append(f"{row} ({policy})")
            fidelity.append(cell.get("fidelity/J&F", np.nan))
            accuracy.append(cell.get("J&F", np.nan))
    figure = Figure(figsize=(8.0, 1.0 + 0.32 * len(labels)), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(labels))
    axes.barh(positions - 0.2, fidelity, height=0.4, label="fidelity J&F (vs float masks)")
    axes.barh(positions + 0.2, accuracy, height=0.4, label="J&F (vs labels)")
    axes.set(yticks=positions, yticklabels=labels, xlim=(0, 1), xlabel="score", title=config.name)
    axes.invert_yaxis()
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=130)
    return path


# ------------------------------------------------------------------------------------------------------ CLI


PROG = "python -m mqsam2.compare"


def parser() -> ArgumentParser:
    cli = ArgumentParser(prog=PROG, description=__doc__, default_env=False, exit_on_error=False)
    cli.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    cli.add_class_arguments(CompareConfig, as_group=False)
    return cli


def parse_config(argv: list[str] | None = None) -> CompareConfig:
    values = parse_arguments(parser(), argv, PROG)
    return CompareConfig(**{k: v for k, v in vars(values).items() if k in CompareConfig.__dataclass_fields__})


def _log_progress(name: str) -> None:
    """Progress lines on stdout, each stamped with the time and `name` (a row process names itself)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name} | %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )


def main(argv: list[str] | None = None) -> int:
    _log_progress("mqsam2")
    return run_command(
        lambda: Grid(parse_config(argv)).run(),
        on_stop="finished cells are kept; rerun the same command to continue the grid",
    )


if __name__ == "__main__":
    sys.exit(main())
