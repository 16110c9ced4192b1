"""Where a unit's calibration cache lives while the unit is fitted, and how its batches reach the GPU.

A cache within the GPU budget (`reconstruction.cache_gb`; by default half of the free GPU memory) lives on the
GPU and each step's batch is gathered there. A larger one stays in pinned host memory and is streamed: each
step's samples are copied straight into the rows of the batch on a side stream one step ahead, so the copy
overlaps the step before it. Under bf16-mixed the cache is held in bf16 (the unit's matmuls read bf16 anyway),
which halves both the memory and the copies.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mqsam2.reconstruct.cache import Batch, UnitCache


@dataclass(frozen=True)
class CachePolicy:
    """`device`: "auto" (by `budget_gb`), "cuda" (always on the GPU) or "cpu" (always streamed from the
    host); `budget_gb` None means half of the GPU memory free when the unit starts; `bf16`: hold floating
    tensors in bf16."""

    device: str = "auto"
    budget_gb: float | None = None
    bf16: bool = False

    def on_device(self, nbytes: int, free_bytes: int) -> bool:
        """Whether a cache of `nbytes` lives on the GPU."""
        if self.device != "auto":
            return self.device == "cuda"
        budget = free_bytes // 2 if self.budget_gb is None else int(self.budget_gb * 2**30)
        return nbytes <= budget

    def place(self, cache: UnitCache, device: torch.device) -> UnitCache:
        """A copy of the cache cast to its dtype, then moved to `device` or pinned in host memory (CPU runs:
        on the host); the cache given is left as it was."""
        cache = cache.copy().to(dtype=torch.bfloat16 if self.bf16 else None)
        if device.type != "cuda":
            return cache.to("cpu")
        free, _ = torch.cuda.mem_get_info(device)
        return cache.to(device) if self.on_device(cache.nbytes, free) else cache.to("cpu").pin()


def host_budget(gb: float | None) -> int | None:
    """Bytes a capture pass may hold in host memory for several units: `gb`, or half of the memory available
    now (Linux), or no limit where that cannot be read."""
    if gb is not None:
        return int(gb * 2**30)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return None


class BatchFeeder:
    """Each step's batch on the compute device: gathered there from a cache on the device, or copied from the
    host with the next step's copy started before this step runs. `draw(step)` gives a step's sample indices;
    any step may come first (a resumed fit), and the batches equal those of a cache on the device. `streamed`
    defaults to whether the cache lives elsewhere."""

    def __init__(
        self,
        cache: UnitCache,
        device: torch.device,
        draw: Callable[[int], list[int]],
        streamed: bool | None = None,
    ):
        self.cache = cache
        self.device = torch.device(device)
        self.draw = draw
        self.streamed = cache.device != self.device if streamed is None else streamed
        self._stream = (
            torch.cuda.Stream(self.device) if self.streamed and self.device.type == "cuda" else None
        )
        self._ahead: tuple[int, list[int], Batch, torch.cuda.Event | None] | None = None

    def __call__(self, step: int) -> tuple[list[int], Batch]:
        """(sample indices, batch) of `step`."""
        if not self.streamed:
            indices = self.draw(step)
            return indices, self.cache.batch(indices)
        if self._ahead is not None and self._ahead[0] == step:
            _, indices, batch, ready = self._ahead
        else:
            indices, batch, ready = self._copy(step)
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in batch.tensors():
                tensor.record_stream(current)
        self._ahead = (step + 1, *self._copy(step + 1))
        return indices, batch

    def _copy(self, step: int) -> tuple[list[int], Batch, torch.cuda.Event | None]:
        indices = self.draw(step)
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream:
            batch = self.cache.batch(indices, device=self.device)
            ready = self._stream.record_event() if self._stream is not None else None
        return indices, batch, ready
