"""Validation-loop evaluation: J&F (with the configured memory policy) and mask mAP, logged and drawn."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch

from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import PromptKind, clip_prompts, score_tracks, track
from mqsam2.memory.policies import using_memory_policy
from mqsam2.metrics.coco import MaskMAP, mask_map
from mqsam2.metrics.jandf import JandF
from mqsam2.overlays import save_overlay
from mqsam2.wandb_images import log_images


class EvaluationCallback(L.Callback):
    """Evaluates `pl_module.model` (the quantized video predictor) at the end of every validation epoch.

    Logs `val/J`, `val/F`, `val/J&F` against labels and `val/mAP` (+ mAP50, mAP75), and, when the module has an
    `fp_model`, the same against the FP model's own masks as `val/fidelity/...`. `memory_policy` (e.g. "sis")
    is applied to both models for the evaluation with `memory_options` (its defaults when empty), so fidelity
    isolates quantization damage under that policy; None keeps each model's own. Clips and images are split
    across ranks, each rank scores its share and the metrics sync through torchmetrics. They are indexed one at
    a time, so a lazy set (`mqsam2.data.validation_set`) is read from its shards clip by clip, never held whole.
    The first `overlays` clips of rank 0 are drawn (GT / FP / quantized) into `<log_dir>/overlays/`, and sent
    to W&B when a WandbLogger is active.
    """

    def __init__(
        self,
        clips: Sequence = (),
        images: Sequence = (),
        *,
        prompt: PromptKind = "box",
        detections: str | Path | Sequence[dict] | None = None,
        memory_policy: str | None = "sis",
        memory_options: dict | None = None,
        overlays: int = 2,
        overlay_frames: int = 4,
    ):
        if not clips and not images:
            raise MQSAM2Error(
                "EvaluationCallback has nothing to evaluate: give validation clips and/or images"
            )
        self.clips, self.images, self.prompt = clips, images, prompt
        self.detections = detections
        self.memory_policy, self.memory_options = memory_policy, dict(memory_options or {})
        self.overlays, self.overlay_frames = overlays, overlay_frames

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        model, fp_model = pl_module.model, getattr(pl_module, "fp_model", None)
        metrics = {}
        if self.clips:
            metrics |= self._evaluate_video(trainer, pl_module.device, model, fp_model)
        if self.images:
            metrics |= {f"val/{k}": v for k, v in self._image_stats(trainer, pl_module.device, model).items()}
            if fp_model is not None:
                stats = self._image_stats(trainer, pl_module.device, model, fp_model)
                metrics |= {f"val/fidelity/{k}": v for k, v in stats.items()}
        for name, value in metrics.items():
            pl_module.log(name, value, sync_dist=True)  # equal on every rank already; keeps DDP logging quiet

    def _image_stats(self, trainer: L.Trainer, device, model, reference=None) -> dict[str, float]:
        share = self.images[trainer.global_rank :: trainer.world_size]
        stats = mask_map(model, share, self.detections, reference=reference, metric=MaskMAP().to(device))
        return {k: stats[k] for k in ("mAP", "mAP50", "mAP75")}

    def _evaluate_video(self, trainer: L.Trainer, device: torch.device, model, fp_model) -> dict[str, float]:
        vs_labels, vs_fp = JandF().to(device), JandF().to(device)
        drawn = []
        with ExitStack() as stack:
            for m in (model, fp_model):
                if m is not None:
                    stack.enter_context(using_memory_policy(m, self.memory_policy, **self.memory_options))
            for i in range(trainer.global_rank, len(self.clips), trainer.world_size):
                clip = self.clips[i]  # decoded now (a lazy set), dropped after this iteration
                prompts = clip_prompts(clip, self.prompt)
                pred = track(model, clip, prompts)
                score_tracks(vs_labels, pred, clip.masks, clip, prompts, annotated_only=True)
                reference = track(fp_model, clip, prompts) if fp_model is not None else None
                if reference is not None:
                    score_tracks(vs_fp, pred, reference, clip, prompts, annotated_only=False)
                if trainer.is_global_zero and len(drawn) < self.overlays:
                    drawn.append(self._draw(trainer, clip, prompts, pred, reference))
        if drawn:
            log_images(trainer.loggers, "val/overlays", drawn, step=trainer.global_step)
        metrics = {}
        # Label-free clips (no annotated frame after a prompt, on any rank) only give fidelity.
        if trainer.strategy.reduce(vs_labels.tracks.clone(), reduce_op="sum") > 0:
            metrics |= {f"val/{k}": float(v) for k, v in vs_labels.compute().items()}
        if fp_model is not None:
            metrics |= {f"val/fidelity/{k}": float(v) for k, v in vs_fp.compute().items()}
        return metrics

    def _draw(self, trainer: L.Trainer, clip, prompts, pred, reference) -> Path:
        start = min(p.frame for p in prompts.values())
        steps = torch.linspace(start, len(clip.frames) - 1, self.overlay_frames).round().long().unique()
        rows = {"GT": clip.masks} | ({"FP": reference} if reference is not None else {}) | {"quantized": pred}
        root = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"
        path = root / f"epoch{trainer.current_epoch:03d}_{clip.video_id}.png"
        return save_overlay(
            path,
            clip.frames,
            rows,
            steps.tolist(),
            title=f"{clip.video_id} ({self.memory_policy or 'own'} memory)",
        )
