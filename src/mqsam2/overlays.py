"""Qualitative overlays: the same frames with masks from GT, the FP model and the quantized model, one row each."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from mqsam2.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from mqsam2.files import atomic_output


def to_rgb(frame: Tensor, size: tuple[int, int]) -> np.ndarray:
    """A normalised [3, S, S] frame as uint8 [H, W, 3] at the video's resolution (sam2's normalisation undone)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (frame.float().cpu() * std + mean).clamp(0, 1)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return (image.permute(1, 2, 0) * 255).round().byte().numpy()


def blend(image: np.ndarray, masks: Tensor, alpha: float = 0.5) -> np.ndarray:
    """Masks bool [O, H, W] painted over an image, one tab10 colour per object."""
    out = image.astype(np.float32)
    colours = colormaps["tab10"].colors
    for i, mask in enumerate(masks.numpy()):
        colour = np.array(colours[i % len(colours)], dtype=np.float32) * 255
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.round().astype(np.uint8)


def save_overlay(
    path: str | Path, frames: Tensor, rows: Mapping[str, Tensor], frame_ids: Sequence[int], title: str = ""
) -> Path:
    """A grid PNG: one row per mask source (bool [O, T, H, W]), one column per chosen frame."""
    path = Path(path)
    size = next(iter(rows.values())).shape[-2:]
    fig = Figure(figsize=(3 * len(frame_ids), 2.4 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), len(frame_ids), squeeze=False)
    for r, (label, masks) in enumerate(rows.items()):
        for c, t in enumerate(frame_ids):
            ax = axes[r, c]
            ax.imshow(blend(to_rgb(frames[t], tuple(size)), masks[:, t]))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label)
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    with atomic_output(path) as stream:
        fig.savefig(stream, dpi=80, format="png")
    return path
