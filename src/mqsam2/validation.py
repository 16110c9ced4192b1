"""Evaluation as a Lightning validation loop: the validation items as a loader of each rank's share, and the module
that tracks each item with the quantized and the float model and scores J&F and mask mAP (docs/evaluation.md)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import PromptKind, clip_prompts, score_tracks, track
from mqsam2.memory.policies import using_memory_policy
from mqsam2.memory.predictor import Prompt, VideoPredictor
from mqsam2.metrics.coco import MaskMAP, against_reference, load_detections, predict_instances
from mqsam2.metrics.jandf import JandF
from mqsam2.models import TensorImagePredictor

log = logging.getLogger(__name__)


def rank_share(count: int, rank: int, world: int) -> list[int | None]:
    """Indices `rank::world` of `count` items, padded with None to the longest rank's share.

    Every rank then runs the same number of steps (Lightning refuses a rank with an empty loader, and one that
    skipped its loop would leave the others waiting in the metrics' sync). A None step scores nothing, unlike
    DistributedSampler's padding, which repeats items and so would count them twice.
    """
    share: list[int | None] = list(range(rank, count, world))
    return share + [None] * ((count + world - 1) // world - len(share))


@dataclass(frozen=True)
class ValidationItem:
    """One clip or image of the validation set."""

    kind: Literal["clip", "image"]
    sample: Any  # VideoClip or ImageSample


class ValidationShard(Dataset):
    """A rank's share of the clips, then of the images (`rank_share`). Each item is indexed from its set when the
    loader asks for it, so a lazy set (`mqsam2.data.validation_set`) is decoded one item at a time."""

    def __init__(self, clips: Sequence, images: Sequence, rank: int, world: int):
        self.sources = {"clip": clips, "image": images}
        self.items = [("clip", i) for i in rank_share(len(clips), rank, world)]
        self.items += [("image", i) for i in rank_share(len(images), rank, world)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> ValidationItem | None:
        kind, index = self.items[position]
        return None if index is None else ValidationItem(kind, self.sources[kind][index])


def _as_is(item: ValidationItem | None) -> ValidationItem | None:
    """The loader's collate: each item goes to its step as it is, neither batched nor converted."""
    return item


class ValidationData(L.LightningDataModule):
    """The validation clips and images as one loader of this rank's share, its items one at a time and kept on
    the CPU (the predictors move what they need). Use it with `Trainer(use_distributed_sampler=False)`: the
    share is already this rank's."""

    def __init__(self, clips: Sequence = (), images: Sequence = ()):
        super().__init__()
        if not clips and not images:
            raise MQSAM2Error("nothing to evaluate: give validation clips and/or images")
        self.clips, self.images = clips, images

    def val_dataloader(self) -> DataLoader:
        shard = ValidationShard(self.clips, self.images, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(shard, batch_size=None, collate_fn=_as_is, num_workers=0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch


@dataclass
class ClipTracks:
    """What a clip's step returns for callbacks (overlays): the prompts and both models' masks [O, T, H, W]."""

    prompts: dict[int, Prompt]
    masks: Tensor
    reference: Tensor


class EvaluationModule(L.LightningModule):
    """Scores `model` (the quantized video predictor) on each validation item, against the labels and against
    `fp_model`'s own masks for the same prompts (fidelity).

    Logs `val/J`, `val/F`, `val/J&F` and `val/mAP` (+ mAP50, mAP75), and the same as `val/fidelity/...`. Clips
    are tracked by both models under `memory_policy` (e.g. "sis", with `memory_options`; None keeps each
    model's own), so fidelity isolates quantization damage under that policy. The metrics are torchmetrics
    states, synced across ranks when the epoch ends; label-free clips (no annotated frame after a prompt, on any
    rank) only give fidelity, so `val/J` and co. are logged when some rank scored an annotated track.
    """

    def __init__(
        self,
        model: VideoPredictor,
        fp_model: VideoPredictor,
        *,
        prompt: PromptKind = "box",
        detections: str | Path | Sequence[dict] | None = None,
        memory_policy: str | None = "sis",
        memory_options: dict | None = None,
    ):
        super().__init__()
        self.model, self.fp_model = model, fp_model
        self.prompt = prompt
        self.detections = None if detections is None else load_detections(detections)
        self.memory_policy, self.memory_options = memory_policy, dict(memory_options or {})
        self.jandf, self.fidelity_jandf = JandF(), JandF()
        self.mask_map, self.fidelity_mask_map = MaskMAP(), MaskMAP()
        self._image_predictors: tuple[TensorImagePredictor, TensorImagePredictor] | None = None

    def on_validation_start(self) -> None:
        if isinstance(getattr(self.trainer.val_dataloaders, "sampler", None), DistributedSampler):
            raise MQSAM2Error(
                "the validation loader has a DistributedSampler, whose padding repeats items that the metrics "
                "would count twice: use ValidationData with Trainer(use_distributed_sampler=False)"
            )
        # Built once per loop, not per image: each scripts sam2's transforms.
        self._image_predictors = (TensorImagePredictor(self.model), TensorImagePredictor(self.fp_model))

    def on_validation_end(self) -> None:
        self._image_predictors = None

    def on_validation_epoch_start(self) -> None:
        for metric in (self.jandf, self.fidelity_jandf, self.mask_map, self.fidelity_mask_map):
            metric.reset()

    def validation_step(self, batch: ValidationItem | None, batch_idx: int) -> ClipTracks | None:
        if batch is None:  # a step that evens out the ranks' shares
            return None
        log.info(
            "validation loop: item %d of %d (%s), quantized and FP, memory %s",
            batch_idx + 1,
            self.trainer.num_val_batches[0],
            batch.kind,
            self.memory_policy or "of each model",
        )
        if batch.kind == "clip":
            return self._score_clip(batch.sample)
        self._score_image(batch.sample)
        return None

    def _track(self, model: VideoPredictor, clip, prompts: dict[int, Prompt]) -> Tensor:
        with using_memory_policy(model, self.memory_policy, **self.memory_options):
            return track(model, clip, prompts)

    def _score_clip(self, clip) -> ClipTracks:
        prompts = clip_prompts(clip, self.prompt)
        masks = self._track(self.model, clip, prompts)
        score_tracks(self.jandf, masks, clip.masks, clip, prompts, annotated_only=True)
        reference = self._track(self.fp_model, clip, prompts)
        score_tracks(self.fidelity_jandf, masks, reference, clip, prompts, annotated_only=False)
        return ClipTracks(prompts, masks, reference)

    def _score_image(self, sample) -> None:
        predictor, reference = self._image_predictors
        prediction = predict_instances(predictor, sample, self.detections)
        self.mask_map.update(prediction, sample)
        target = predict_instances(reference, sample, self.detections)
        self.fidelity_mask_map.update(*against_reference(prediction, target))

    def _total(self, count: Tensor) -> int:
        """A count summed over the ranks."""
        return int(self.trainer.strategy.reduce(count.clone(), reduce_op="sum"))

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for prefix, jandf in (("val", self.jandf), ("val/fidelity", self.fidelity_jandf)):
            if self._total(jandf.tracks):
                metrics |= {f"{prefix}/{k}": float(v) for k, v in jandf.compute().items()}
        if self._total(self.mask_map.images):
            for prefix, mask_map in (("val", self.mask_map), ("val/fidelity", self.fidelity_mask_map)):
                stats = mask_map.compute()
                metrics |= {f"{prefix}/{k}": stats[k] for k in ("mAP", "mAP50", "mAP75")}
        for name, value in metrics.items():
            self.log(name, value, sync_dist=True)  # equal on every rank already; keeps DDP logging quiet
