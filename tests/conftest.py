"""Shared fixtures: small random-init SAM2 models, a short generated clip (no downloads anywhere) and the local
Slurm cluster, which lives no longer than the test session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


START_CLUSTER = Path(__file__).parent / "slurm" / "start_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """The environment of a one-node Slurm cluster (tests/slurm/start_cluster.sh), started on first use and
    stopped, daemons and all, when the session ends (a cluster that was up before is left as it was); skipped,
    printing why, when Slurm cannot run here."""
    folder = os.environ.get("MQSAM2_SLURM_DIR", "/tmp/mqsam2-slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "WANDB_SERVICE"}
    env |= {"SLURM_CONF": f"{folder}/slurm.conf", "MQSAM2_SLURM_DIR": folder}
    start = subprocess.run(["bash", str(START_CLUSTER)], env=env, capture_output=True, text=True, timeout=900)
    if start.returncode != 0:
        reason = f"Slurm could not start here: {(start.stderr or start.stdout).strip()}"
        print(reason)
        pytest.skip(reason)
    lines = Path(folder, "env").read_text().splitlines()
    env |= dict(line.split("=", 1) for line in lines if "=" in line)  # SLURM_CONF, an unpacked prefix's paths
    yield env
    if "start_cluster: started" in start.stdout:
        subprocess.run(["bash", str(START_CLUSTER), "stop"], env=env, check=True, timeout=120)
