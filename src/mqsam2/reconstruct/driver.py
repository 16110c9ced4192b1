"""Reconstruct every unit in order, one Lightning fit per unit (and phase), resumable at any point.

Run directory layout: units/<unit>/<phase>.pt is the unit's state once a phase is finished (written atomically
by rank 0); units/<unit>/<phase>/ holds Lightning's checkpoints (last.ckpt, SLURM's hpc_ckpt_*.ckpt) and CSV
logs of the phase in progress. A restarted run loads finished phases, resumes the interrupted one from its
newest checkpoint, and never recomputes finished work.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DataLoader

from mqsam2.config import ReconstructionConfig
from mqsam2.distributed import rank_and_world, trainer_layout
from mqsam2.errors import MQSAM2Error
from mqsam2.quant.lsc import ClippingSession
from mqsam2.reconstruct.cache import UnitCache, capture_unit, chain_cache
from mqsam2.reconstruct.hvq import HierarchicalVideoLoss, is_video_unit
from mqsam2.reconstruct.module import UnitReconstruction, unit_error
from mqsam2.reconstruct.report import plot_loss_curve, read_metrics
from mqsam2.reconstruct.rounding import BetaSchedule
from mqsam2.reconstruct.units import Unit, reconstruction_units
from mqsam2.wandb_images import log_images
from mqsam2.workload import Workload

log = logging.getLogger(__name__)

# Units train in eval mode on purpose (no dropout or drop-path: reconstruction matches deployment; QDrop is
# driven by the quantizers' drop_prob), and batches are drawn by global step, so a mid-epoch resume is exact.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


@dataclass(frozen=True)
class Phase:
    name: str
    iters: int
    learn_rounding: bool
    learn_act: bool
    drop_prob: float = 0.0
    act_quant_on: bool = True
    learn_clipping: bool = False


def phases(config: ReconstructionConfig) -> list[Phase]:
    """QDrop learns everything at once; BRECQ weights (activations float) then activation steps; AdaRound
    learns only rounding, layer by layer; LSC learns clipping ranges and the weights (rounding to nearest)."""
    if config.mode == "qdrop":
        return [Phase("qdrop", config.iters, True, True, config.drop_prob)]
    if config.mode == "brecq":
        return [
            Phase("weights", config.iters, True, False, act_quant_on=False),
            Phase("activations", config.act_iters or config.iters, False, True),
        ]
    if config.mode == "adaround":
        return [Phase("rounding", config.iters, True, False)]
    if config.mode == "lsc":
        return [Phase("lsc", config.iters, False, False, learn_clipping=True)]
    return []


def unit_dir(run_dir: Path, unit: str) -> Path:
    return run_dir / "units" / unit


def newest_checkpoint(directory: Path) -> Path | None:
    """last.ckpt or SLURM's hpc_ckpt_*.ckpt, whichever was written last."""
    candidates = [*directory.glob("last*.ckpt"), *directory.glob("hpc_ckpt_*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def progress_bar(total_steps: int) -> TQDMProgressBar:
    """Every step on a terminal; about twenty updates per fit in logs (Slurm, CI), which are not terminals."""
    return TQDMProgressBar(refresh_rate=1 if sys.stdout.isatty() else max(1, total_steps // 20))


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _cache_device(config: ReconstructionConfig, cache: UnitCache, device: torch.device) -> torch.device:
    """Keep the cache on the GPU when it fits in half of the free memory, else in host memory."""
    if device.type != "cuda" or config.cache_device == "cpu":
        return torch.device("cpu")
    if config.cache_device == "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if cache.nbytes < free // 2 else torch.device("cpu")


class Reconstructor:
    """Owns the loop over units; each unit is captured, fitted phase by phase, hardened and saved."""

    def __init__(
        self,
        model: nn.Module,
        float_model: nn.Module,
        workload: Workload,
        config: ReconstructionConfig,
        run_dir: Path,
        loggers: list[Logger] | None = None,
        seed: int = 0,
        only: list[str] | None = None,
        callbacks: list[L.Callback] | None = None,
    ):
        self.model = model
        self.float_model = float_model
        self.config = config
        self.run_dir = Path(run_dir)
        self.loggers = loggers or []
        self.seed = seed
        self.callbacks = callbacks or []
        self.rank, self.world_size = rank_and_world()
        self.workload = workload.shard(self.rank, self.world_size)
        self.all_units = reconstruction_units(model, config.mode)
        self.units = self.all_units
        if only is not None:
            unknown = sorted(set(only) - {unit.name for unit in self.units})
            if unknown:
                raise MQSAM2Error(f"no reconstruction unit named {', '.join(unknown)} in mode {config.mode}")
            self.units = [unit for unit in self.units if unit.name in only]

    def run(self) -> None:
        plan = phases(self.config)
        previous: tuple[Unit, UnitCache] | None = None
        for index, unit in enumerate(self.units, start=1):
            log.info("unit %d/%d: %s (%d layers)", index, len(self.units), unit.name, len(unit.layers))
            cache = None
            for phase in plan:
                done = unit_dir(self.run_dir, unit.name) / f"{phase.name}.pt"
                if done.exists():
                    unit.module.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
                    log.info("  %s: finished earlier, loaded %s", phase.name, done)
                    continue
                cache = cache or self.capture(unit, previous)
                self.fit_phase(unit, phase, cache)
            previous = (unit, cache) if cache is not None else None

    def capture(self, unit: Unit, previous: tuple[Unit, UnitCache] | None = None) -> UnitCache:
        """Record the unit's calibration tensors. A unit in a chain of blocks derives them from the previous
        unit's cache (recomputed the same way after a restart, so resumed runs see identical tensors)."""
        start = time.perf_counter()
        float_unit = self.float_model.get_submodule(unit.name)
        if unit.follows is not None:
            before = next(u for u in self.all_units if u.name == unit.follows)
            if previous is None or previous[0].name != unit.follows:
                previous = (before, self.capture(before))
            cache = chain_cache(previous[1], before.module, float_unit, unit.name, self.config.batch_size)
        else:
            cache = capture_unit(
                unit.name,
                unit.module,
                float_unit,
                run_quant=lambda: self.workload.run(self.model, unit.encoder_only),
                run_float=lambda: self.workload.run(self.float_model, unit.encoder_only),
                batchable=unit.batchable,
            )
            device = next(self.model.parameters()).device
            cache.to(_cache_device(self.config, cache, device))
        log.info(
            "  captured %d samples (%.1f MiB) in %.1f s",
            len(cache),
            cache.nbytes / 2**20,
            time.perf_counter() - start,
        )
        return cache

    def _trainer(self, phase_dir: Path, iters: int, attempt: str) -> L.Trainer:
        config = self.config
        loggers = [CSVLogger(phase_dir, name="logs", version=attempt), *self.loggers]
        checkpoint = ModelCheckpoint(
            dirpath=phase_dir, every_n_train_steps=config.checkpoint_every, save_last=True, save_top_k=0
        )
        return L.Trainer(
            max_steps=iters,
            accelerator=config.accelerator,
            **trainer_layout(config.strategy),
            precision=config.precision,
            logger=loggers,
            callbacks=[checkpoint, progress_bar(iters), *self.callbacks],
            default_root_dir=phase_dir,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            log_every_n_steps=max(1, min(50, iters // 20)),
        )

    def fit_phase(self, unit: Unit, phase: Phase, cache: UnitCache) -> None:
        phase_dir = unit_dir(self.run_dir, unit.name) / phase.name
        phase_dir.mkdir(parents=True, exist_ok=True)
        error_before = unit_error(unit, cache)
        if phase.learn_rounding:
            for layer in unit.layers.values():
                layer.weight_quantizer.start_adaround(layer.weight)
        for quantizer in unit.act_quantizers.values():
            quantizer.enabled = phase.act_quant_on
        # LSC steps run eagerly: its running statistics update in place at every forward, which graph capture's
        # warm-up passes would repeat.
        clipping = ClippingSession(unit, cache, self.config.lsc) if phase.learn_clipping else None
        module = UnitReconstruction(
            unit,
            cache,
            max_steps=phase.iters,
            learn_rounding=phase.learn_rounding,
            learn_act=phase.learn_act,
            drop_prob=phase.drop_prob,
            lr_rounding=self.config.lr_rounding,
            lr_act=self.config.lr_act,
            reg_weight=self.config.reg_weight,
            beta=BetaSchedule(phase.iters, self.config.beta_start, self.config.beta_end, self.config.warmup),
            seed=self.seed,
            check_finite_every=self.config.check_finite_every,
            compile=self.config.compile,
            cuda_graphs=self.config.cuda_graphs and self.world_size == 1 and clipping is None,
            extra_groups=clipping.param_groups() if clipping else (),
            objective=self._objective(unit, cache),
        )
        module.batch_size = self.config.batch_size
        module.log_prefix = f"{unit.name}/{phase.name}/"
        resume = newest_checkpoint(phase_dir)
        attempt = f"attempt{len(list((phase_dir / 'logs').glob('attempt*')))}"
        trainer = self._trainer(phase_dir, phase.iters, attempt)
        start = time.perf_counter()
        first_step = (
            torch.load(resume, map_location="cpu", weights_only=False)["global_step"] if resume else 0
        )
        if resume:
            log.info("  %s: resuming from %s (step %d)", phase.name, resume.name, first_step)
        trainer.fit(module, DataLoader(range(phase.iters), batch_size=None), ckpt_path=resume)
        seconds = time.perf_counter() - start
        if clipping is not None:
            clipping.finish()
        module.finish()
        for quantizer in unit.act_quantizers.values():
            quantizer.enabled = True
        if self.rank == 0:
            _save_atomic(unit.module.state_dict(), unit_dir(self.run_dir, unit.name) / f"{phase.name}.pt")
            for stale in phase_dir.glob("*.ckpt"):
                stale.unlink()
            errors = {"error_before": error_before, "error_after": unit_error(unit, cache)}
            self._report(unit, phase, phase_dir, phase.iters - first_step, seconds, errors)

    def _objective(self, unit: Unit, cache: UnitCache) -> HierarchicalVideoLoss | None:
        """Q-MiniSAM2's HVQ loss on the video units when asked for; the plain output error elsewhere."""
        if self.config.video_loss == "hvq" and is_video_unit(unit.name):
            return HierarchicalVideoLoss(self.config.hvq, cache)
        return None

    def _report(
        self, unit: Unit, phase: Phase, phase_dir: Path, steps: int, seconds: float, errors: dict
    ) -> None:
        metrics = read_metrics(phase_dir / "logs")
        curve = plot_loss_curve(
            metrics, phase_dir.parent / f"{phase.name}_loss.png", f"{unit.name} ({phase.name})"
        )
        if curve is not None:
            log_images(self.loggers, f"{unit.name}/{phase.name}/loss_curve", [curve])
        record = {
            "unit": unit.name,
            "phase": phase.name,
            "layers": len(unit.layers),
            "iters": phase.iters,
            "steps_this_run": steps,
            "seconds": round(seconds, 3),
            "it_per_s": round(steps / seconds, 3) if seconds > 0 else None,
            "final_rec_loss": metrics["rec_loss"][-1][1] if metrics.get("rec_loss") else None,
            "world_size": self.world_size,
            **errors,
        }
        log.info(
            "  %s: output error %.4g -> %.4g in %.1f s (%.1f it/s)",
            phase.name,
            errors["error_before"],
            errors["error_after"],
            seconds,
            record["it_per_s"] or 0.0,
        )
        with open(self.run_dir / "units.jsonl", "a") as stream:
            stream.write(json.dumps(record) + "\n")
