"""Builds a shard set in parallel processes, resumably: each shard is one task, a finished shard is skipped.

Converters describe the work as tasks (the shard's path, its items, and a picklable function that turns one
item into samples); this module runs them, keeps bad items out under --skip-bad and reports what it did.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mqsam2.data.format import DataError, Sample, ShardWriter
from mqsam2.files import write_text

log = logging.getLogger("mqsam2.data")

SETTINGS_FILE = "build.json"


@dataclass(frozen=True)
class ShardTask:
    path: Path
    items: Sequence[Any]
    make_samples: Callable[[Any], list[Sample]]


@dataclass
class ShardResult:
    path: Path
    samples: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class BuildReport:
    """What a build did; `shards` lists the whole set, whether built now or by an earlier run."""

    shards: list[Path]
    built: int = 0
    resumed: int = 0
    samples: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        where = self.shards[0].parent if self.shards else "-"
        return (
            f"{where}: {len(self.shards)} shards ({self.built} written, {self.resumed} already complete), "
            f"{self.samples} samples, {len(self.skipped)} bad items skipped, "
            f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s"
        )


def chunk_tasks(
    out_dir: Path,
    prefix: str,
    items: Sequence[Any],
    shard_size: int,
    make_samples: Callable[[Any], list[Sample]],
) -> list[ShardTask]:
    """Items in order, `shard_size` to a shard; the same items and size give the same shards on every run."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    return [
        ShardTask(out_dir / f"{prefix}-{n:06d}.tar", items[start : start + shard_size], make_samples)
        for n, start in enumerate(range(0, len(items), shard_size))
    ]


def claim_output(out_dir: Path, settings: dict[str, Any]) -> None:
    """Remember what a directory is built from, so a resumed run cannot mix shards of other settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings, default=str))
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(
                k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k)
            )
            raise DataError(
                f"{path}: this directory was built with different settings ({', '.join(changed)}); "
                "use another --out or delete the directory"
            )
    else:
        write_text(path, json.dumps(settings, indent=1) + "\n")


def _run_task(task: ShardTask, skip_bad: bool) -> ShardResult:
    result = ShardResult(task.path)
    with ShardWriter(task.path) as writer:
        for item in task.items:
            try:
                samples = task.make_samples(item)
            except DataError as exc:
                if not skip_bad:
                    raise
                result.skipped.append(str(exc))
                continue
            for sample in samples:
                writer.write(sample)
                result.samples += 1
    result.bytes = task.path.stat().st_size
    return result


def build_shards(
    tasks: Sequence[ShardTask],
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
    desc: str = "",
) -> BuildReport:
    """Run the tasks whose shard does not exist yet; the first bad item stops the build unless skip_bad."""
    start = time.perf_counter()
    report = BuildReport(shards=[t.path for t in tasks])
    todo = [t for t in tasks if not t.path.exists()]
    report.resumed = len(tasks) - len(todo)
    bar = tqdm(total=len(tasks), initial=report.resumed, unit="shard", desc=desc, disable=not progress)

    def record(result: ShardResult) -> None:
        report.built += 1
        report.samples += result.samples
        report.bytes += result.bytes
        for line in result.skipped:
            log.warning("skipped: %s", line)
        report.skipped += result.skipped
        bar.update()
        bar.set_postfix(samples=report.samples, skipped=len(report.skipped))

    with bar:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                record(_run_task(task, skip_bad))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
                pending = {pool.submit(_run_task, task, skip_bad) for task in todo}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        if future.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise future.exception()
                        record(future.result())
    report.seconds = time.perf_counter() - start
    return report
