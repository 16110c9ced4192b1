"""How closely a deployed model's masks follow the model it came from: box prompts on the same images through
both, mask IoU (the J of `mqsam2.metrics`) per prompt.

Prompts and masks live in the pixels of the model's S x S input (an image prepared by the data layer), so
neither side resizes anything differently from the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mqsam2.metrics import region_similarity
from mqsam2.models import TensorImagePredictor

# (image [3, S, S], boxes [N, 4] xyxy in input pixels) -> mask logits [N, S, S]
BoxPredictor = Callable[[torch.Tensor, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PromptSet:
    """One prepared image and the boxes to prompt it with (input pixels)."""

    image: torch.Tensor
    boxes: np.ndarray


@dataclass(frozen=True)
class MaskFidelity:
    """Mask IoU of a candidate against a reference over every box: mean, worst, and how many boxes."""

    iou_mean: float
    iou_min: float
    prompts: int

    def as_dict(self) -> dict:
        return {"iou_mean": self.iou_mean, "iou_min": self.iou_min, "prompts": self.prompts}


def torch_box_predictor(model: nn.Module) -> BoxPredictor:
    """sam2's image predictor on a PyTorch SAM2 (float, fake-quant or deployed), single-mask output."""
    predictor = TensorImagePredictor(model)
    size = model.image_size

    def predict(image: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        predictor.set_image_tensor(image, (size, size))
        logits = [
            predictor.predict(box=box, multimask_output=False, return_logits=True)[0][0] for box in boxes
        ]
        return np.stack(logits)

    return predict


def onnx_box_predictor(predictor) -> BoxPredictor:
    """The same for an `mqsam2.deploy.onnx.OnnxImagePredictor`."""

    def predict(image: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        predictor.set_image(image)
        return np.stack([predictor.predict_box(box)[0][0] for box in boxes])

    return predict


def mask_fidelity(
    reference: BoxPredictor, candidate: BoxPredictor, prompts: Sequence[PromptSet]
) -> MaskFidelity:
    """IoU of the candidate's masks (logits > 0) against the reference's, one value per box."""
    ious = []
    for prompt in prompts:
        ref = torch.from_numpy(reference(prompt.image, prompt.boxes) > 0)
        got = torch.from_numpy(candidate(prompt.image, prompt.boxes) > 0)
        ious.append(region_similarity(got, ref))
    iou = torch.cat(ious)
    return MaskFidelity(float(iou.mean()), float(iou.min()), len(iou))


def prompt_sets(samples, image_size: int, max_boxes: int = 3) -> list[PromptSet]:
    """Data-layer image samples (boxes in original pixels) as prompt sets in input pixels."""
    prompts = []
    for sample in samples:
        if not len(sample.boxes):
            continue
        height, width = sample.orig_size
        scale = np.array([image_size / width, image_size / height] * 2, dtype=np.float32)
        prompts.append(PromptSet(sample.image, sample.boxes[:max_boxes].numpy() * scale))
    return prompts
