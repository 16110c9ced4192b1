"""An endless-looking video generated on the device frame by frame: long-stream benchmarks need 10,000 frames at
1024 px without holding them (sam2 reads `state["images"][t]` on demand, so any indexable works)."""

from __future__ import annotations

import math

import torch

from mqsam2.data.loaders import IMAGENET_MEAN, IMAGENET_STD


class SyntheticStream:
    """A textured background with a disk drifting on a Lissajous path and breathing in size; frames by index."""

    def __init__(self, num_frames: int, image_size: int, video_size: tuple[int, int], device: torch.device):
        self.num_frames, self.image_size, self.video_size, self.device = (
            num_frames,
            image_size,
            video_size,
            device,
        )
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(1, 3, 12, 16, generator=g)
        self.background = torch.nn.functional.interpolate(coarse, size=video_size, mode="bilinear")[0].to(
            device
        )
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    def __len__(self) -> int:
        return self.num_frames

    def mask(self, t: int) -> torch.Tensor:
        h, w = self.video_size
        cy = h * (0.5 + 0.3 * math.sin(t / 47))
        cx = w * (0.5 + 0.35 * math.sin(t / 29 + 1))
        r = min(h, w) * (0.15 + 0.05 * math.sin(t / 13))
        ys = torch.arange(h, device=self.device)[:, None]
        xs = torch.arange(w, device=self.device)[None, :]
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r

    def __getitem__(self, t: int) -> torch.Tensor:
        rgb = torch.where(
            self.mask(t), torch.tensor([0.9, 0.2, 0.1], device=self.device).view(3, 1, 1), self.background
        )
        size = (self.image_size, self.image_size)
        resized = torch.nn.functional.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False)[
            0
        ]
        return (resized - self.mean) / self.std
