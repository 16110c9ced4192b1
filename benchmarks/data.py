"""Read throughput of the video loader: frames per second per DataLoader worker for 1024-px clips.

Makes synthetic 1024-px shards on first use (data/bench by default), then times one epoch of
video_dataset -> DataLoader(collate_fn=collate_clips) per worker count: JPEG decode, resize to the model size,
normalisation to float32, RLE mask decode and hand-over to the main process, worker start-up included.
Workers 0 is the main process alone, for reference. Frames per CPU-second (main process plus workers) is
the number to compare on a shared machine, where wall-clock rates depend on the load.
Usage: python benchmarks/data.py [--workers 0 1 2] [--clips 24]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from mqsam2.data import collate_clips, video_dataset, write_synth


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(shards: list[str], image_size: int, clips: int, workers: int) -> tuple[int, float, float]:
    """(frames read, wall seconds, CPU seconds) for one epoch of `clips` clips."""
    dataset = video_dataset(shards, image_size, epoch_len=clips, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate_clips)
    start, cpu = time.perf_counter(), _cpu_seconds()
    frames = sum(int(batch.lengths.sum()) for batch in loader)
    del loader  # joins the workers, so their CPU time is counted
    return frames, time.perf_counter() - start, _cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/bench", help="where the synthetic shards go")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--size", type=int, default=1024, help="stored frame size and model input size")
    parser.add_argument("--clips", type=int, default=24, help="clips per timed epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    shards = write_synth(args.data, args.videos, args.frames, args.size, seed=0, images=0, shard_size=2)
    torch.set_num_threads(1)  # one core per process: the workers are the parallelism
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs (load average {load}), torch {torch.__version__}")
    print(f"{args.size}px JPEG frames -> {args.size}px float32 model input, {args.frames}-frame clips\n")
    print("| workers | clips | frames | seconds | frames/s | frames/s per worker | frames per CPU-second |")
    print("|--------:|------:|-------:|--------:|---------:|--------------------:|----------------------:|")
    for workers in args.workers:
        frames, seconds, cpu = measure(shards.videos, args.size, args.clips, workers)
        rate = frames / seconds
        cells = [
            workers,
            args.clips,
            frames,
            f"{seconds:.1f}",
            f"{rate:.1f}",
            f"{rate / max(workers, 1):.1f}",
        ]
        print("| " + " | ".join(map(str, [*cells, f"{frames / cpu:.1f}"])) + " |")


if __name__ == "__main__":
    main()
