"""`RunDir`: the one owner of a fit run's directory, runs/<name>/.

It alone knows the artifacts' names, decides whether a config may use the directory (its resume identity comes
from the config dataclasses' own `runtime` field metadata), keeps the per-unit records and loads a finished
run's model. Every write goes through `mqsam2.files`, so each artifact is whole or absent.

    config.yaml        the config, written once it has been validated
    importance.json    Eq. 2-4 per layer                      plan.json, allocation.png   Eq. 6
                                                              sensitivity.png             why each width
    calibrated.pt      every tensor of the calibrated model   metrics.json, eval/         evaluation
    calibrated_model.pt  a recipe run's whole calibrated model (mqsam2.api.quantize_sam2)
    units/<unit>/<phase>.pt    a unit's state once that phase finished (the phase's completion mark)
    units/<unit>/<phase>.json  its record, written before the state; units.jsonl is derived from them
    units/<unit>/<phase>/      Lightning checkpoints and CSV logs of the phase in progress
    export/model.mq    the packed export and its model card   wandb_id.txt                the W&B run id
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from mqsam2.allocation import read_plan
from mqsam2.config import FitConfig, ReconstructionConfig, config_dict, load_config, resume_identity
from mqsam2.errors import MQSAM2Error
from mqsam2.export.card import card_paths
from mqsam2.files import TMP_SUFFIX, load_torch, make_folder, write_text
from mqsam2.memory.policies import set_memory_policy
from mqsam2.models import build_architecture, config_name
from mqsam2.quant.swap import quantize
from mqsam2.reconstruct.phases import phases
from mqsam2.reconstruct.units import reconstruction_units

log = logging.getLogger("mqsam2")


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for key in sorted(old.keys() | new.keys())
            for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class RunDir:
    """runs/<name>/ and every artifact in it (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, config: FitConfig) -> RunDir:
        return cls(Path(config.run_root) / config.name)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ---- artifact names -----------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def importance(self) -> Path:
        return self.path / "importance.json"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def allocation_figure(self) -> Path:
        return self.path / "allocation.png"

    @property
    def sensitivity_figure(self) -> Path:
        """Bits per layer against the layer's cost weight and measured error (`plot_sensitivity`)."""
        return self.path / "sensitivity.png"

    @property
    def calibrated(self) -> Path:
        return self.path / "calibrated.pt"

    @property
    def calibrated_model(self) -> Path:
        """The whole calibrated model and its allocation (`mqsam2.api.quantize_sam2`'s resume point), for
        methods whose module structure a state dict cannot rebuild (e.g. PTQ4SAM's quantized attention)."""
        return self.path / "calibrated_model.pt"

    @property
    def unit_log(self) -> Path:
        return self.path / "units.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def overlays(self) -> Path:
        return self.eval_dir / "overlays"

    @property
    def export(self) -> Path:
        return self.path / "export" / "model.mq"

    def results(self) -> list[tuple[str, Path]]:
        """What a user looks at after a run, each that exists with what it is: the table, the card, the plan's
        figure, the overlays and the deployable file."""
        shown = [
            ("metrics", self.metrics),
            ("model card", card_paths(self.export)[0]),
            ("allocation", self.allocation_figure),
            ("overlays", self.overlays),
            ("export", self.export),
        ]
        return [(label, path) for label, path in shown if path.exists()]

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id.txt"

    def deployment(self, target: str) -> Path:
        """Where `python -m mqsam2.deploy --target <target>` writes its artefact and report."""
        return self.path / "deploy" / target

    def unit_dir(self, unit: str) -> Path:
        return self.path / "units" / unit

    def phase_state(self, unit: str, phase: str) -> Path:
        return self.unit_dir(unit) / f"{phase}.pt"

    def phase_record(self, unit: str, phase: str) -> Path:
        return self.unit_dir(unit) / f"{phase}.json"

    def phase_dir(self, unit: str, phase: str) -> Path:
        return self.unit_dir(unit) / phase

    def finished_work(self) -> list[Path]:
        """Artifacts that mean some stage has done work under the saved config."""
        fixed = [
            self.importance,
            self.plan,
            self.calibrated,
            self.calibrated_model,
            self.metrics,
            self.export,
        ]
        units = self.path / "units"
        return [p for p in fixed if p.exists()] + (sorted(units.glob("*/*")) if units.is_dir() else [])

    # ---- claiming the directory for a config ----------------------------------------------------------------
    def claim(self, config: FitConfig, rank: int = 0) -> None:
        """Use this directory for `config`: a new directory, or one whose work was done under a config with the
        same resume identity, or one where no stage has finished yet (a failed first attempt may be rerun with
        a corrected config). Rank 0 then writes config.yaml and drops temporaries a killed run left."""
        done = self.finished_work()
        if done and self.config_file.exists():
            changed = _differences(resume_identity(self.read_config()), resume_identity(config))
            if changed:
                raise MQSAM2Error(
                    f"run directory {self.path} was made with another config ({'; '.join(changed[:3])}) and holds "
                    f"its results ({done[0].relative_to(self.path)}): choose another --name, or delete the "
                    "directory to start over"
                )
            log.info("resuming run %s", self.path)
        elif self.config_file.exists():
            log.info("run %s: no stage had finished, so it starts again under this config", self.path)
        if rank == 0:
            make_folder(self.path)
            for stale in self.path.rglob(f".*{TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
            write_text(self.config_file, yaml.safe_dump(config_dict(config), sort_keys=False))

    def read_config(self) -> FitConfig:
        if not self.config_file.is_file():
            raise MQSAM2Error(f"{self.path} is not a fit run directory: {self.config_file.name} is missing")
        try:
            return load_config(self.config_file)
        except MQSAM2Error as exc:
            raise MQSAM2Error(f"{self.config_file} cannot be read by this mqsam2 ({exc})") from None

    # ---- unit records ---------------------------------------------------------------------------------------
    def write_record(self, unit: str, phase: str, record: dict) -> None:
        write_text(self.phase_record(unit, phase), json.dumps(record) + "\n")

    def write_unit_log(self, order: list[tuple[str, str]]) -> None:
        """units.jsonl from the records of the (unit, phase) pairs that have finished, in `order`; derived,
        so rewriting it after any interruption restores every finished unit's line."""
        lines = [
            self.phase_record(unit, phase).read_text()
            for unit, phase in order
            if self.phase_state(unit, phase).is_file() and self.phase_record(unit, phase).is_file()
        ]
        write_text(self.unit_log, "".join(lines))

    def bit_averages(self) -> tuple[float | None, float | None]:
        """What plan.json's allocation spends: the parameter-weighted weight and the element-weighted
        activation bit-widths (None before the allocation, or where activations were not counted)."""
        if not self.plan.is_file():
            return None, None
        report = json.loads(self.plan.read_text())
        return report.get("average_bits"), report.get("act_average_bits") or None

    def unit_records(self) -> list[dict]:
        if not self.unit_log.is_file():
            return []
        return [json.loads(line) for line in self.unit_log.read_text().splitlines() if line]

    # ---- loading --------------------------------------------------------------------------------------------
    def load_state(self, path: Path) -> dict[str, torch.Tensor]:
        """A state dict this run wrote; a damaged one names the file and how to recompute it."""
        return load_torch(path, "run artifact", f"delete it and rerun the fit to recompute it ({self.path})")

    def load_model(self) -> tuple[nn.Module, FitConfig]:
        """The run's final quantized video predictor, rebuilt from this directory alone (no FP checkpoint): the
        architecture from config.yaml, the plan, calibrated.pt (a recipe run: its whole calibrated model,
        calibrated_model.pt), then each reconstructed unit's phases in order. Units outside
        `reconstruction.units` keep their calibrated (round-to-nearest) state."""
        config = self.read_config()
        resume = f"finish it with python -m mqsam2.fit --config {self.config_file}"
        if config.recipe.method is not None:
            return self._recipe_model(config, resume), config
        for artifact in (self.plan, self.calibrated):
            if not artifact.is_file():
                raise MQSAM2Error(f"run {self.path} has no {artifact.name} yet: {resume}")
        model = build_architecture(
            config_name(config.model.size, config.model.version), config.model.image_size, video=True
        )
        quantize(model, dataclasses.replace(config.quant, plan=read_plan(self.plan)))
        model.load_state_dict(self.load_state(self.calibrated))
        self._load_units(model, config.reconstruction, resume)
        return model, config

    def _recipe_model(self, config: FitConfig, resume: str) -> nn.Module:
        """A recipe run's model: the calibrated model `mqsam2.api.quantize_sam2` stored, its units learned
        as the method learns them, tracking with the method's memory policy."""
        from mqsam2 import api  # the api imports this module

        if not self.calibrated_model.is_file():
            raise MQSAM2Error(f"run {self.path} has no {self.calibrated_model.name} yet: {resume}")
        recipe = api.recipe_of(config.recipe, config.quant, config.reconstruction, config.seed)
        model = torch.load(self.calibrated_model, map_location="cpu", weights_only=False)["model"]
        self._load_units(model, api.unit_reconstruction(recipe), resume)
        if recipe.resolved.memory_policy is not None:
            set_memory_policy(model, recipe.resolved.memory_policy)
        return model

    def _load_units(self, model: nn.Module, reconstruction: ReconstructionConfig, resume: str) -> None:
        """Each reconstructed unit's finished phases into `model`, in order (none for mode `none`)."""
        if reconstruction.mode == "none":
            return
        only = reconstruction.units
        for unit in reconstruction_units(model, reconstruction.mode):
            if only is not None and unit.name not in only:
                continue
            for phase in phases(reconstruction):
                done = self.phase_state(unit.name, phase.name)
                if not done.is_file():
                    raise MQSAM2Error(
                        f"run {self.path} is unfinished: unit {unit.name} has no {phase.name}.pt; {resume}"
                    )
                unit.module.load_state_dict(self.load_state(done))
