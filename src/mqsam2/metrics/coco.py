"""COCO mask mAP with box prompts: SAM2's image predictor on GT boxes or a detector's boxes, scored by COCOeval.

Protocol (method.md §7): each box prompts one single-mask prediction; its score is the predicted IoU (times the
detector's score when boxes come from a detector); COCO segm mAP through pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sam2.modeling.sam2_base import SAM2Base
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from mqsam2.errors import MQSAM2Error
from mqsam2.models import TensorImagePredictor

STAT_NAMES = (
    "mAP",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)  # in COCOeval.stats order


@dataclass
class Instances:
    """One image's masks (bool [N, H, W], original size) with scores and categories: predictions or a reference."""

    image_id: int
    masks: Tensor
    scores: Tensor
    category_ids: list[int]


def load_detections(detections: str | Path | Iterable[dict]) -> dict[int, list[dict]]:
    """A detector's COCO results (file or list of {image_id, category_id, bbox xywh, score}) grouped by image."""
    if isinstance(detections, str | Path):
        path = Path(detections)
        if not path.is_file():
            raise MQSAM2Error(f"detections file not found: {path} (a COCO results JSON)")
        detections = json.loads(path.read_text())
    by_image: dict[int, list[dict]] = defaultdict(list)
    for det in detections:
        missing = {"image_id", "category_id", "bbox", "score"} - det.keys()
        if missing:
            raise MQSAM2Error(f"detection {det} lacks {', '.join(sorted(missing))}: use COCO results format")
        by_image[int(det["image_id"])].append(det)
    return dict(by_image)


def box_prompts(sample, detections: dict[int, list[dict]] | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """Prompts for one image: boxes xyxy [N, 4] in original pixels, their scores and categories."""
    if detections is None:
        boxes = torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
        return boxes, torch.ones(len(boxes)), [int(c) for c in sample.category_ids]
    dets = detections.get(int(sample.image_id), [])
    xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    return boxes, torch.tensor([float(d["score"]) for d in dets]), [int(d["category_id"]) for d in dets]


def predict_instances(
    predictor: TensorImagePredictor, sample, detections: dict[int, list[dict]] | None = None
) -> Instances:
    """One single-mask prediction per box prompt; score = predicted IoU x box score."""
    boxes, box_scores, categories = box_prompts(sample, detections)
    height, width = (int(v) for v in sample.orig_size)
    if not len(boxes):
        return Instances(
            int(sample.image_id), torch.zeros(0, height, width, dtype=torch.bool), box_scores, []
        )
    predictor.set_image_tensor(sample.image, (height, width))
    masks, ious, _ = predictor.predict(box=boxes.numpy(), multimask_output=False)
    masks = torch.from_numpy(masks).reshape(len(boxes), height, width) > 0
    scores = torch.from_numpy(ious).reshape(len(boxes)).float() * box_scores
    return Instances(int(sample.image_id), masks, scores, categories)


def _rle(mask: Tensor) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _image_entry(item) -> tuple[dict, list[dict]]:
    """One image's COCO `images` entry and its annotations (without ids) from its bool `masks` [N, H, W]."""
    height, width = item.masks.shape[-2:]
    annotations = []
    for mask, category in zip(item.masks, item.category_ids, strict=True):
        rle = _rle(mask)
        annotations.append(
            {
                "image_id": int(item.image_id),
                "category_id": int(category),
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),
                "iscrowd": 0,
            }
        )
    return {"id": int(item.image_id), "height": int(height), "width": int(width)}, annotations


def _coco(images: list[dict], annotations: list[dict]) -> COCO:
    if not images:
        raise MQSAM2Error("no images to evaluate: the image set is empty")
    if not annotations:
        raise MQSAM2Error("no annotated instances in the image set: mAP needs at least one object")
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": [{"id": n, **ann} for n, ann in enumerate(annotations, start=1)],
        "categories": [{"id": c} for c in sorted({ann["category_id"] for ann in annotations})],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_ground_truth(items: Sequence) -> COCO:
    """A COCO ground truth from images with `image_id`, bool `masks` [N, H, W] and `category_ids`.

    Takes the data layer's ImageSample or `Instances` (a reference model's masks, for fidelity); areas and boxes
    come from the masks, as for COCO's own RLE annotations.
    """
    entries = [_image_entry(item) for item in items]
    return _coco([image for image, _ in entries], [ann for _, anns in entries for ann in anns])


def coco_results(instances: Iterable[Instances]) -> list[dict]:
    """COCO results entries (RLE segmentation) for predicted instances."""
    return [
        {"image_id": inst.image_id, "category_id": int(c), "segmentation": _rle(m), "score": float(s)}
        for inst in instances
        for m, s, c in zip(inst.masks, inst.scores, inst.category_ids, strict=True)
    ]


def segm_stats(gt: COCO, results: list[dict]) -> dict[str, float]:
    """COCOeval segm summary (mAP@[.5:.95], mAP50, mAP75, by area, AR) of results against a ground truth."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes(results)
        else:  # pycocotools cannot load an empty result list; no detections scores 0 (or -1 where no GT)
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STAT_NAMES, (float(v) for v in evaluator.stats), strict=True))


def _gather_bytes(state: Tensor, group=None) -> list[Tensor]:
    """torchmetrics' gather, except that the empty float tensor it stands in for a rank that scored no image (its
    byte lists are empty) is sent as the bytes it replaces: ranks must gather one dtype."""
    return gather_all_tensors(state.to(torch.uint8) if state.is_floating_point() else state, group)


class MaskMAP(Metric):
    """COCO segm stats accumulated image by image and synced across ranks (each rank scores its share). The
    state is the images' COCO entries as JSON lines of RLE text (a few KB per image): no masks or pixels are
    kept. Each state is a list of byte tensors, one line per image: torchmetrics gathers lists whose lengths
    differ between ranks, while it stacks tensor states, which must then agree in shape."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"dist_sync_fn": _gather_bytes, **kwargs})
        self.add_state("truth", [], dist_reduce_fx="cat")
        self.add_state("predictions", [], dist_reduce_fx="cat")
        self.add_state("images", torch.tensor(0), dist_reduce_fx="sum")

    def _append(self, name: str, value) -> None:
        line = bytearray(json.dumps(value).encode() + b"\n")
        getattr(self, name).append(torch.frombuffer(line, dtype=torch.uint8).to(self.device))

    def update(self, prediction: Instances, target) -> None:
        """One image: the prediction's instances against `target` (an ImageSample or a reference's Instances)."""
        self._append("truth", _image_entry(target))
        self._append("predictions", coco_results([prediction]))
        self.images += 1

    def _decoded(self, name: str) -> list:
        state = getattr(self, name)  # one tensor per image, or all ranks' lines in one once synced
        data = dim_zero_cat(state).cpu().numpy().tobytes() if len(state) else b""
        return [json.loads(line) for line in data.splitlines()]

    def compute(self) -> dict[str, float]:
        truth = self._decoded("truth")
        gt = _coco([image for image, _ in truth], [ann for _, anns in truth for ann in anns])
        return segm_stats(gt, [result for results in self._decoded("predictions") for result in results])


def mask_map(
    model: SAM2Base,
    samples: Sequence,
    detections: str | Path | Iterable[dict] | None = None,
    reference: SAM2Base | None = None,
    metric: MaskMAP | None = None,
) -> dict[str, float]:
    """COCO segm stats of a (quantized) SAM2 on images prompted by their GT boxes or by `detections`.

    Scored against the labels, or with `reference` (the FP model) against its masks for the same prompts
    (fidelity: no labels needed beyond the prompts; a prompt on which the reference predicts an empty mask is
    left out with its prediction, since COCO can match nothing to an empty mask). Images are predicted one at a time; with a `metric` placed
    on a rank's device, `samples` is that rank's share and the stats are those of all ranks' images.
    """
    if not samples and metric is None:
        raise MQSAM2Error("no images to evaluate: the image set is empty")
    dets = None if detections is None else load_detections(detections)
    metric = metric if metric is not None else MaskMAP()
    predictor = TensorImagePredictor(model)
    reference_predictor = TensorImagePredictor(reference) if reference is not None else None
    for sample in samples:
        prediction = predict_instances(predictor, sample, dets)
        if reference_predictor is None:
            metric.update(prediction, sample)
        else:
            target = predict_instances(reference_predictor, sample, dets)
            metric.update(*against_reference(prediction, target))
    return metric.compute()


def against_reference(prediction: Instances, reference: Instances) -> tuple[Instances, Instances]:
    """One image's prediction and the reference's masks for the same prompts, as MaskMAP.update takes them:
    prompts on which the reference predicts an empty mask are left out, since COCO can match nothing to one."""
    scorable = reference.masks.flatten(1).any(1)
    return _select(prediction, scorable), _select(reference, scorable)


def _select(instances: Instances, keep: Tensor) -> Instances:
    return Instances(
        instances.image_id,
        instances.masks[keep],
        instances.scores[keep],
        [c for c, k in zip(instances.category_ids, keep.tolist(), strict=True) if k],
    )
