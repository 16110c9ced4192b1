"""Shared fixtures: small random-init SAM2 models and a short generated clip (no downloads anywhere)."""

from __future__ import annotations

import os

import pytest
import torch

from mqsam2.data.loaders import IMAGENET_MEAN, IMAGENET_STD

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

IMAGE_SIZE = 256
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture
def tiny_video_model():
    from mqsam2.models import build_sam2

    return build_sam2("t", image_size=IMAGE_SIZE)


def _moving_square_clip(frames: int = 6, size: int = IMAGE_SIZE, seed: int = 0):
    """A textured square sliding over a gradient: frames normalised like sam2's loader, exact masks."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    background = torch.stack([xs / size, ys / size, 0.5 * torch.ones(size, size)])
    texture = torch.rand(3, 48, 48, generator=generator)
    images, masks = [], []
    for t in range(frames):
        image = background.clone()
        top, left = 60 + 6 * t, 40 + 10 * t
        image[:, top : top + 48, left : left + 48] = texture
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[top : top + 48, left : left + 48] = True
        images.append((image - MEAN) / STD)
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


@pytest.fixture
def square_clip():
    return _moving_square_clip()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
