"""One compare row under the measurement engine's variants, side by side in one run: seconds per stage, frames/s
of evaluation and the row's fidelity under each.

Variants: `old` is the engine before batching (every tracking pass one object at a time: calibration, each loop
unit's replay, evaluation), `new` tracks every object of every clip in batches, `bf16` adds bf16 autocast to
the reconstruction steps, `shared` replaces the loop units' twelve exact replays by one shared replay. Each
variant runs the float row (its reference masks: evaluation of the float model) and the row in a folder of its
own, so nothing is reused between them.

    python benchmarks/grid.py --checkpoint ../shared/models/sam21t_512_synth.pt --calib <shards> --val <shards>
    python benchmarks/grid.py                     # toy size on a CPU: random-init model, synthetic shards
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from common import describe_device

from mqsam2.compare import CompareConfig, Grid, Row
from mqsam2.config import DataConfig, ModelConfig, ReconstructionConfig
from mqsam2.memory.batched import one_object_at_a_time
from mqsam2.quant.swap import QuantConfig

VARIANTS = {
    "new": {"precision": "32-true", "capture": "sequential", "batched": True},
    "bf16": {"precision": "bf16-mixed", "capture": "sequential", "batched": True},
    "shared": {"precision": "32-true", "capture": "shared", "batched": True},
    "old": {"precision": "32-true", "capture": "sequential", "batched": False},
}
STAGES = ("calibrate_s", "capture_s", "steps_s", "harden_s", "evaluate_s")


def grid_config(args: argparse.Namespace, variant: str) -> CompareConfig:
    settings = VARIANTS[variant]
    toy = args.checkpoint is None
    data = DataConfig(
        root=str(Path(args.out) / "synth"),
        video_shards=None if toy else [args.calib],
        val_video_shards=None if toy else [args.val],
        synth_videos=args.calib_videos,
        synth_frames=max(args.calib_frames, args.val_frames),
        synth_size=args.image_size,
        synth_images=0,
        synth_objects=[1, 3],
        calib_videos=args.calib_videos,
        calib_frames=args.calib_frames,
        calib_images=0,
        val_videos=args.val_videos,
        val_frames=args.val_frames,
        val_images=0,
    )
    reconstruction = ReconstructionConfig(
        iters=args.iters,
        units=args.units,
        precision=settings["precision"],
        capture=settings["capture"],
        accelerator="auto",
        checkpoint_every=10_000,
    )
    return CompareConfig(
        name=variant,
        out_root=str(Path(args.out) / "grids"),
        model=ModelConfig(size=args.size, checkpoint=args.checkpoint, image_size=args.image_size),
        data=data,
        quant=QuantConfig(observer_sample_size=args.observer_sample_size),
        reconstruction=reconstruction,
        memory=["fifo"],
        rows=[Row("fp"), Row(args.method, args.bits)],
        images=False,
        gain_samples=[1, min(8, args.calib_frames), 0],
    )


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    grid = Grid(grid_config(args, variant))
    engine = contextlib.nullcontext() if VARIANTS[variant]["batched"] else one_object_at_a_time()
    start = time.perf_counter()
    with engine:
        results = grid.run()
    wall = time.perf_counter() - start
    fp, row = (results[name]["cells"]["fifo"] for name in ("fp", grid.config.rows[1].name))
    frames = sum(len(clip.frames) for clip in grid.data.val_videos)
    tracks = sum(len(prompts) for prompts in grid.prompts)
    return {
        "variant": variant,
        **{stage: row["times"][stage] for stage in STAGES},
        "row_s": round(sum(row["times"][stage] for stage in STAGES), 1),
        "wall_s": round(wall, 1),
        "float_eval_frames_per_s": round(frames / max(fp["times"]["evaluate_s"], 1e-9), 1),
        "eval_frames_per_s": round(frames / max(row["times"]["evaluate_s"], 1e-9), 1),
        "gpu_peak_gib": row["times"]["gpu_peak_gib"],
        "fidelity": round(row["fidelity/J&F"], 4),
        "clips": len(grid.data.val_videos),
        "tracks": tracks,
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    header = [
        "variant",
        *STAGES,
        "row s",
        "float eval frames/s",
        "eval frames/s",
        "GPU peak GiB",
        "fidelity J&F",
    ]
    lines = [
        f"{describe_device()}: {args.method} {args.bits:g} bits, {args.iters} iterations per unit; "
        f"{rows[0]['clips']} validation clips x {args.val_frames} frames ({rows[0]['tracks']} tracks), "
        f"calibration {args.calib_videos} clips x {args.calib_frames} frames",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [r["variant"], *(f"{r[s]:.1f}" for s in STAGES), f"{r['row_s']:.1f}"]
        cells += [f"{r['float_eval_frames_per_s']:.1f}", f"{r['eval_frames_per_s']:.1f}"]
        cells += ["-" if r["gpu_peak_gib"] is None else f"{r['gpu_peak_gib']:.1f}", f"{r['fidelity']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--checkpoint", help="the trained model (default: random-init at toy size)")
    cli.add_argument("--calib", help="calibration video shards (with --checkpoint)")
    cli.add_argument("--val", help="validation video shards (with --checkpoint)")
    cli.add_argument("--out", default="runs/bench_grid")
    cli.add_argument("--variants", default="new,bf16,shared,old")
    cli.add_argument("--method", default="qdrop")
    cli.add_argument("--bits", type=float, default=4)
    cli.add_argument("--size", default="t")
    cli.add_argument("--image-size", type=int, default=None)
    cli.add_argument("--iters", type=int, default=None)
    cli.add_argument("--calib-videos", type=int, default=None)
    cli.add_argument("--calib-frames", type=int, default=None)
    cli.add_argument("--val-videos", type=int, default=None)
    cli.add_argument("--val-frames", type=int, default=None)
    cli.add_argument("--observer-sample-size", type=int, default=1 << 20)
    cli.add_argument("--units", nargs="+", help="reconstruct only these units (default: all)")
    args = cli.parse_args(argv)
    toy = args.checkpoint is None
    if not toy and (args.calib is None or args.val is None):
        cli.error("--checkpoint needs --calib and --val shards")
    defaults = {
        "image_size": 64,
        "iters": 2,
        "calib_videos": 2,
        "calib_frames": 4,
        "val_videos": 2,
        "val_frames": 4,
    }
    full = {
        "image_size": 512,
        "iters": 200,
        "calib_videos": 8,
        "calib_frames": 20,
        "val_videos": 60,
        "val_frames": 16,
    }
    for key, value in (defaults if toy else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        cli.error(f"unknown variants {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    out = Path(args.out)
    rows = []
    for variant in args.variants.split(","):
        rows.append(run_variant(args, variant))
        report = table(rows, args)  # after every variant: a timed-out run still leaves the finished ones
        print(report, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(report + "\n")
        (out / "bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
