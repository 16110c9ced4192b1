"""Reconstruct every unit in order, one Lightning fit per unit (and phase), resumable at any point.

The run directory (`mqsam2.rundir.RunDir`, passed in) names the files: a finished phase leaves its record and
then the unit's state (the completion mark, written atomically by rank 0); the phase in progress keeps
Lightning's checkpoints (last.ckpt, SLURM's hpc_ckpt_*.ckpt) and CSV logs. A restarted run loads finished
phases, resumes the interrupted one from its newest checkpoint, and never recomputes finished work.

A phase that leaves its unit's output error more than `max_error_growth` times its starting error stops the
run, or with `on_blowup: keep_rtn` restores the unit's round-to-nearest state and says so in its record.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

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
from mqsam2.files import load_torch, save_torch
from mqsam2.quant.lsc import ClippingSession
from mqsam2.quant.swap import quantized_layers
from mqsam2.reconstruct.cache import UnitCache
from mqsam2.reconstruct.capture import Capturer
from mqsam2.reconstruct.hvq import HierarchicalVideoLoss, is_video_unit
from mqsam2.reconstruct.module import UnitReconstruction, unit_error
from mqsam2.reconstruct.phases import Phase, phases
from mqsam2.reconstruct.placement import CachePolicy, host_budget
from mqsam2.reconstruct.report import plot_loss_curve, read_metrics
from mqsam2.reconstruct.rounding import BetaSchedule
from mqsam2.reconstruct.tf32 import TensorFloat32
from mqsam2.reconstruct.units import Unit, reconstruction_units
from mqsam2.slurm import lightning_requeues
from mqsam2.stages import stage
from mqsam2.wandb_images import log_images
from mqsam2.workload import Workload

if TYPE_CHECKING:
    from mqsam2.rundir import RunDir

log = logging.getLogger(__name__)

# Units train in eval mode on purpose (no dropout or drop-path: reconstruction matches deployment; QDrop is
# driven by the quantizers' drop_prob), and batches are drawn by global step, so a mid-epoch resume is exact.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


def newest_checkpoint(directory: Path) -> Path | None:
    """last.ckpt or SLURM's hpc_ckpt_*.ckpt, whichever was written last."""
    candidates = [*directory.glob("last*.ckpt"), *directory.glob("hpc_ckpt_*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def progress_bar(total_steps: int) -> TQDMProgressBar:
    """Every step on a terminal; about twenty updates per fit in logs (Slurm, CI), which are not terminals."""
    return TQDMProgressBar(refresh_rate=1 if sys.stdout.isatty() else max(1, total_steps // 20))


class Reconstructor:
    """Owns the loop over units; each unit is captured, fitted phase by phase, hardened and saved."""

    def __init__(
        self,
        model: nn.Module,
        float_model: nn.Module,
        workload: Workload,
        config: ReconstructionConfig,
        run_dir: RunDir,
        loggers: list[Logger] | None = None,
        seed: int = 0,
        only: list[str] | None = None,
        callbacks: list[L.Callback] | None = None,
    ):
        self.model = model
        self.float_model = float_model
        self.config = config
        self.run_dir = run_dir
        self.loggers = loggers or []
        self.seed = seed
        self.callbacks = callbacks or []
        self.rank, self.world_size = rank_and_world()
        self.workload = workload.shard(self.rank, self.world_size)
        self.all_units = reconstruction_units(model, config.mode)
        layers = quantized_layers(model).values()
        self.average_bits = sum(layer.bits * layer.weight.numel() for layer in layers) / max(
            1, sum(layer.weight.numel() for layer in layers)
        )
        self.units = self.all_units
        if only is not None:
            unknown = sorted(set(only) - {unit.name for unit in self.units})
            if unknown:
                raise MQSAM2Error(f"no reconstruction unit named {', '.join(unknown)} in mode {config.mode}")
            self.units = [unit for unit in self.units if unit.name in only]
        self.capturer = Capturer(
            model,
            float_model,
            self.workload,
            self.all_units,
            config.capture,
            config.batch_size,
            place=self._place,
            host_budget=lambda: host_budget(config.host_cache_gb),
        )
        self.capturer.plan(self.units, self.units)

    def run(self) -> None:
        plan = phases(self.config)
        self._write_unit_log()  # a run stopped between a unit's state and its log line gets the line back
        self.capturer.plan(self.units, [u for u in self.units if not self._finished(u, plan)])
        for index, unit in enumerate(self.units, start=1):
            log.info("unit %d/%d: %s (%d layers)", index, len(self.units), unit.name, len(unit.layers))
            with stage("capture"):
                self.capturer.before(unit)
            cache = None
            rounded = {k: v.clone() for k, v in unit.module.state_dict().items()}  # round-to-nearest
            for phase in self.unit_plan(unit, plan):
                done = self.run_dir.phase_state(unit.name, phase.name)
                if done.exists():
                    unit.module.load_state_dict(self.run_dir.load_state(done))
                    log.info("  %s: finished earlier, loaded %s", phase.name, done)
                    continue
                cache = cache or self.capture(unit)
                self.fit_phase(unit, phase, cache, rounded)

    def unit_plan(self, unit: Unit, plan: list[Phase]) -> list[Phase]:
        """The phases with this unit's iterations: more for a unit with layers narrower than the model's
        average width (`reconstruction.low_bit_iters`), the same for every unit of a uniform model."""
        if not self.config.low_bit_iters or not unit.layers:
            return plan
        below = max(0, round(self.average_bits) - min(layer.bits for layer in unit.layers.values()))
        factor = 1.0 + self.config.low_bit_iters * below
        return [dataclasses.replace(phase, iters=round(phase.iters * factor)) for phase in plan]

    def _write_unit_log(self) -> None:
        if self.rank == 0:
            plan = phases(self.config)
            self.run_dir.write_unit_log([(u.name, p.name) for u in self.units for p in plan])

    def _finished(self, unit: Unit, plan: list[Phase]) -> bool:
        return all(self.run_dir.phase_state(unit.name, phase.name).exists() for phase in plan)

    def _place(self, cache: UnitCache) -> UnitCache:
        config = self.config
        policy = CachePolicy(
            config.cache_device, config.cache_gb, config.cache_bf16 and "bf16" in config.precision
        )
        return policy.place(cache, next(self.model.parameters()).device)

    def capture(self, unit: Unit) -> UnitCache:
        """The unit's calibration tensors (`mqsam2.reconstruct.capture` says where they come from)."""
        start = time.perf_counter()
        with stage("capture"):
            cache = self.capturer.capture(unit)
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
            callbacks=[checkpoint, progress_bar(iters), TensorFloat32(), *self.callbacks],
            default_root_dir=phase_dir,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            log_every_n_steps=max(1, min(50, iters // 20)),
        )

    def fit_phase(
        self, unit: Unit, phase: Phase, cache: UnitCache, rounded: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Fit one phase, then check the unit's output error against its start (restoring `rounded`, the
        unit's round-to-nearest state, by default its state now, when the config says to keep it) and save."""
        if rounded is None:
            rounded = {k: v.clone() for k, v in unit.module.state_dict().items()}
        phase_dir = self.run_dir.phase_dir(unit.name, phase.name)
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
            fused_kernels=self.config.fused_kernels,
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
            load_torch(resume, "Lightning checkpoint", "delete it to restart the unit's phase", False)[
                "global_step"
            ]
            if resume
            else 0
        )
        if resume:
            log.info("  %s: resuming from %s (step %d)", phase.name, resume.name, first_step)
        with lightning_requeues(), stage("steps"):  # Slurm's warning: Lightning writes an hpc checkpoint
            trainer.fit(module, DataLoader(range(phase.iters), batch_size=None), ckpt_path=resume)
        seconds = time.perf_counter() - start
        with stage("harden"):
            if clipping is not None:
                clipping.finish()
            module.finish()
            for quantizer in unit.act_quantizers.values():
                quantizer.enabled = True
            errors = {"error_before": error_before, "error_after": unit_error(unit, cache)}
        grew = errors["error_after"] > self.config.max_error_growth * error_before
        if trainer.strategy.reduce_boolean_decision(grew, all=False):  # every rank decides alike
            errors |= self._keep_rounded(unit, phase, errors, rounded, cache)
        if self.rank == 0:
            with stage("report"):
                self._report(unit, phase, phase_dir, phase.iters - first_step, seconds, errors)
                save_torch(unit.module.state_dict(), self.run_dir.phase_state(unit.name, phase.name))
                for stale in phase_dir.glob("*.ckpt"):
                    stale.unlink()
                self._write_unit_log()

    def _keep_rounded(self, unit: Unit, phase: Phase, errors: dict, rounded: dict, cache: UnitCache) -> dict:
        """Reconstruction made the unit worse than `max_error_growth` allows: stop, or (on_blowup=keep_rtn)
        restore its round-to-nearest state and return what the record should say."""
        before, after = errors["error_before"], errors["error_after"]
        what = (
            f"unit {unit.name} ({phase.name}): reconstruction made its output error {after / before:.3g}x worse "
            f"({before:.4g} -> {after:.4g}), beyond reconstruction.max_error_growth="
            f"{self.config.max_error_growth:g}"
        )
        if self.config.on_blowup != "keep_rtn":
            raise MQSAM2Error(
                f"{what}: rerun with --reconstruction.on_blowup keep_rtn to keep round-to-nearest weights for "
                "such units (finished units are kept), or start a new run with lower reconstruction.lr_rounding "
                "/ lr_act"
            )
        unit.module.load_state_dict(rounded)
        log.warning("%s: keeping its round-to-nearest weights (reconstruction.on_blowup=keep_rtn)", what)
        return {"error_after": unit_error(unit, cache), "reconstructed_error": after, "kept_rtn": True}

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
            metrics,
            self.run_dir.unit_dir(unit.name) / f"{phase.name}_loss.png",
            f"{unit.name} ({phase.name})",
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
        self.run_dir.write_record(unit.name, phase.name, record)
