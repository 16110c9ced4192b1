"""What the benchmark scripts share: how they name the machine and the synthetic calibration workload they use."""

from __future__ import annotations

import platform

import torch

from mqsam2.data import calibration_set, ensure_synth
from mqsam2.workload import Workload


def describe_device() -> str:
    """The GPU's name, or the CPU and its thread count: printed above every table."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"


def synthetic_workload(
    data_root: str, videos: int, frames: int, images: int, image_size: int, objects: int | None
) -> Workload:
    """Calibration clips and images from the project's synthetic shards (made under `data_root` once)."""
    shards = ensure_synth(data_root, videos, frames, 256, seed=0, images=images)
    data = calibration_set(shards.videos, shards.images, videos, frames, images, image_size)
    return Workload(data.videos, data.images, max_objects=objects)
