"""Where a run's time goes: seconds per stage and the GPU memory peak, collected while a block runs.

The library marks its stages (`stage("capture")` around each unit's capture, ...); whoever wants the figures
(compare's cells and grid.json, the benchmarks) collects them with `collecting()`. Outside a collection the
marks cost nothing. On a GPU each mark synchronises, so queued kernels are charged to the stage that queued them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

STAGES = ("calibrate", "capture", "steps", "harden", "evaluate")


@dataclass
class StageTimes:
    """Seconds per stage (summed over every block marked with it) and the peak GPU memory allocated."""

    seconds: dict[str, float] = field(default_factory=dict)
    gpu_peak_gib: float | None = None

    def add(self, other: dict[str, float]) -> None:
        for name, seconds in other.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self) -> dict[str, float | None]:
        """`<stage>_s` for every stage (0 where it did not run) and `gpu_peak_gib`."""
        names = [*STAGES, *sorted(set(self.seconds) - set(STAGES))]
        return {f"{name}_s": round(self.seconds.get(name, 0.0), 2) for name in names} | {
            "gpu_peak_gib": None if self.gpu_peak_gib is None else round(self.gpu_peak_gib, 2)
        }


_CURRENT: ContextVar[StageTimes | None] = ContextVar("mqsam2_stage_times", default=None)


def synchronize() -> None:
    """Wait for queued GPU work, so a clock read after it counts that work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def collecting() -> Iterator[StageTimes]:
    """Every stage marked inside the block is timed into the yielded `StageTimes`; its GPU peak is the block's."""
    times = StageTimes()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    token = _CURRENT.set(times)
    try:
        yield times
    finally:
        _CURRENT.reset(token)
        if cuda:
            times.gpu_peak_gib = torch.cuda.max_memory_allocated() / 2**30


def summary(times: StageTimes) -> str:
    """One log line: the stages that took time, and the GPU peak."""
    parts = [f"{name} {seconds:.1f} s" for name, seconds in times.seconds.items() if seconds >= 0.05]
    if times.gpu_peak_gib is not None:
        parts.append(f"GPU peak {times.gpu_peak_gib:.1f} GiB")
    return ", ".join(parts) or "no stage timed"


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Charge the block's wall-clock seconds to `name` in the collection in progress (if any)."""
    times = _CURRENT.get()
    if times is None:
        yield
        return
    with charged(times, name):
        yield


@contextlib.contextmanager
def charged(times: StageTimes, name: str) -> Iterator[None]:
    """Charge the block's wall-clock seconds to `name` in `times` (a collection of the caller's own, e.g. fit's
    pipeline stages, which the library's finer marks do not enter)."""
    synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize()
        times.add({name: time.perf_counter() - start})
