"""Validation-loop engineering around `mqsam2.validation.EvaluationModule`: overlays drawn and sent to loggers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from mqsam2.overlays import save_overlay
from mqsam2.validation import ClipTracks, EvaluationModule, ValidationItem
from mqsam2.wandb_images import log_images


class OverlayCallback(L.Callback):
    """Draws the first `overlays` clips of rank 0 (GT / FP / quantized masks on `frames` frames from the prompt
    on) into `<log_dir>/overlays/epochNNN_<video>.png`, from what the module's validation steps return, and
    sends them to W&B when a WandbLogger is active."""

    def __init__(self, overlays: int = 2, frames: int = 4):
        self.overlays, self.frames = overlays, frames
        self.drawn: list[Path] = []
        self.root = Path()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.drawn = []
        # On every rank: under DDP `trainer.log_dir` is a broadcast, which rank 0 alone would wait on forever.
        self.root = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: EvaluationModule,
        outputs: ClipTracks | None,
        batch: ValidationItem | None,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, ClipTracks) and trainer.is_global_zero and len(self.drawn) < self.overlays:
            self.drawn.append(self._draw(trainer, batch.sample, outputs, pl_module.memory_policy))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.drawn:
            log_images(trainer.loggers, "val/overlays", self.drawn, step=trainer.global_step)

    def _draw(self, trainer: L.Trainer, clip, tracks: ClipTracks, memory_policy: str | None) -> Path:
        start = min(p.frame for p in tracks.prompts.values())
        steps = torch.linspace(start, len(clip.frames) - 1, self.frames).round().long().unique()
        rows = {"GT": clip.masks, "FP": tracks.reference, "quantized": tracks.masks}
        return save_overlay(
            self.root / f"epoch{trainer.current_epoch:03d}_{clip.video_id}.png",
            clip.frames,
            rows,
            steps.tolist(),
            title=f"{clip.video_id} ({memory_policy or 'own'} memory)",
        )
