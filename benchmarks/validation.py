"""Validation memory: peak host memory (RSS) of evaluating N validation clips, streamed vs materialized.

Streamed is what the fit does (`mqsam2.data.validation_set`): the set is a list of shard references and each clip
is read and decoded when it is evaluated. Materialized is the former way (`calibration_set`): every clip decoded
up front as float32 frames. Each (mode, N) runs in a fresh process that builds random-init SAM2, selects the set
from synthetic shards and tracks every clip through `evaluate_video_grid` (FIFO memory); the process reports its
peak RSS. A streamed set should cost the same whatever N; a materialized one grows by N x frames x 3 x S^2 x 4 B.

    python benchmarks/validation.py --clips 1 2 4 8 --frames 16 --image-size 256 --figure docs/figures/validation_memory.png
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import describe_device

MODES = ("materialized", "streamed")


def measure(mode: str, clips: int, args: argparse.Namespace) -> dict:
    """In a fresh process: select and evaluate `clips` clips one way, then report this process's peak RSS."""
    from mqsam2.data import calibration_set, ensure_synth, validation_set
    from mqsam2.evaluate import evaluate_video_grid
    from mqsam2.models import build_sam2

    model = build_sam2(args.size, image_size=args.image_size)
    shards = ensure_synth(args.data_root, clips, args.frames, args.image_size, seed=1, images=0)
    select = validation_set if mode == "streamed" else calibration_set
    videos = select(shards.videos, None, clips, args.frames, 0, args.image_size, 0).videos
    rows = evaluate_video_grid({"model": model}, videos, policies=("fifo",))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "clips": clips, "peak_rss_mib": round(peak_mib, 1), "objects": rows[0]["objects"]}


def _in_fresh_process(mode: str, clips: int, args: argparse.Namespace) -> dict:
    """Peak RSS is a per-process high-water mark: each measurement gets a process of its own."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, mode, clips, args).result()


def frames_mib(clips: int, args: argparse.Namespace) -> float:
    """What holding the clips' frames costs: N x T x 3 x S^2 float32."""
    return clips * args.frames * 3 * args.image_size**2 * 4 / 2**20


def plot(results: list[dict], args: argparse.Namespace, path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for mode in MODES:
        points = [(r["clips"], r["peak_rss_mib"]) for r in results if r["mode"] == mode]
        ax.plot(*zip(*points, strict=True), marker="o", label=mode)
    ax.set(xlabel="validation clips", ylabel="peak RSS (MiB)", xscale="log", xticks=args.clips)
    ax.set_xticklabels([str(c) for c in args.clips])
    ax.legend()
    ax.set_title(f"{args.frames} frames at {args.image_size} px per clip, SAM2.1-{args.size}", fontsize=10)
    fig.text(0.01, 0.01, caption, fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--size", default="t")
    parser.add_argument("--data-root", default="data/synth")
    parser.add_argument("--figure", type=Path, help="also draw the table as a PNG here")
    parser.add_argument("--machine", default=None, help="the machine's name for the table and figure")
    args = parser.parse_args()
    results = [_in_fresh_process(mode, clips, args) for clips in args.clips for mode in MODES]
    machine = args.machine or describe_device()
    print(
        f"validation memory: {args.frames} frames x {args.image_size} px per clip, SAM2.1-{args.size}, {machine}"
    )
    print(
        "| clips | frames held if materialized (MiB) | materialized peak RSS (MiB) | streamed peak RSS (MiB) |"
    )
    print("|---|---|---|---|")
    for clips in args.clips:
        peak = {r["mode"]: r["peak_rss_mib"] for r in results if r["clips"] == clips}
        print(
            f"| {clips} | {frames_mib(clips, args):.0f} | {peak['materialized']:.0f} | {peak['streamed']:.0f} |"
        )
    if args.figure:
        command = "python benchmarks/validation.py " + " ".join(sys.argv[1:])
        plot(results, args, args.figure, f"{command}\n{machine}, {datetime.date.today()}")
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
