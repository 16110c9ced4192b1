"""Reconstruction speed, old against new code paths side by side in one process: per unit the capture time,
iterations/s, achieved TFLOP/s against the measured matmul peak and peak GPU memory; per variant the share of
the run spent capturing and the projected full recipe (every unit x 20,000 iterations).

Each variant fits the same units, from the same calibrated model, through the pipeline's own driver
(`Reconstructor.run`: capture, Lightning fit, hardening), `--warmup` + `--steps` iterations per unit; the
steps after the warm-up are timed. Variants:

- old: every loop unit replays the calibration set through both models, float32 caches, unfused fake-quant
  (the code path before sequential capture)
- sequential: float model once, image encoder derived, one quantized replay per loop unit, bf16 caches
- fused: sequential + the Triton kernels (`reconstruction.fused_kernels`)
- shared: fused + one quantized replay for all loop units (`reconstruction.capture: shared`)

    python benchmarks/reconstruction.py --image-size 128 --units image_encoder.trunk.blocks.1 --steps 2  # CPU
    python benchmarks/reconstruction.py --size t --image-size 512 --checkpoint model.pt --precision bf16-mixed \\
        --all-units --variants old fused shared
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import describe_device, synthetic_workload
from torch.utils.flop_counter import FlopCounterMode

from mqsam2.config import ReconstructionConfig
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantize
from mqsam2.reconstruct.driver import Reconstructor
from mqsam2.reconstruct.module import UnitReconstruction
from mqsam2.rundir import RunDir

FULL_ITERS = 20_000
VARIANTS = {
    "old": {"capture": "replay", "fused_kernels": False, "cache_bf16": False},
    "sequential": {"capture": "sequential", "fused_kernels": False, "cache_bf16": True},
    "fused": {"capture": "sequential", "fused_kernels": True, "cache_bf16": True},
    "shared": {"capture": "shared", "fused_kernels": True, "cache_bf16": True},
}


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul TFLOP/s on this device (the ceiling reconstruction is compared against)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def backward_once(module: UnitReconstruction) -> None:
    """One eager forward + backward of the first batch with the regulariser on (as late steps run it)."""
    indices = module.cache.indices(0, module.batch_size, module.seed)
    batch = module.cache.batch(indices, device=module.device)
    module.total_loss(*module.loss_terms(batch, module.beta(module.max_steps - 1))).backward()
    module.zero_grad(set_to_none=True)


def step_flops(module: UnitReconstruction) -> int:
    """Forward + backward FLOPs of one training step (matmuls and convolutions, as FlopCounterMode counts)."""
    with FlopCounterMode(display=False) as counter:
        backward_once(module)
    return counter.get_total_flops()


def profile_step(module: UnitReconstruction, steps: int) -> str:
    """The kernels one eager forward + backward of the unit spends its device time in: what bounds the step,
    compute or memory traffic."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if module.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            backward_once(module)
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
    key = "self_cuda_time_total" if module.device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60)


class UnitMeter(L.Callback):
    """Per unit: capture seconds (the capturer's clock since the previous unit's fit), timed steps after the
    warm-up (synchronised with the device), FLOPs of a step, peak GPU memory since the previous unit."""

    def __init__(self, reconstructor: Reconstructor, warmup: int, profile_steps: int, count_flops: bool):
        self.reconstructor, self.warmup = reconstructor, warmup
        self.profile_steps, self.count_flops = profile_steps, count_flops
        self.rows: list[dict] = []
        self._captured = 0.0

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_start(self, trainer, module):
        capture = self.reconstructor.capturer.seconds - self._captured
        self._captured = self.reconstructor.capturer.seconds
        flops = None
        if self.count_flops:
            with trainer.precision_plugin.forward_context():
                flops = step_flops(module)
        self.rows.append(
            {
                "unit": module.unit.name,
                "samples": len(module.cache),
                "cache_mib": round(module.cache.nbytes / 2**20, 1),
                "streamed": module.cache.device != module.device,
                "capture_s": round(capture, 2),
                "gflop_per_step": None if flops is None else round(flops / 1e9, 2),
            }
        )

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(module)
            self._start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self._sync(module)
        row = self.rows[-1]
        row["steps_s"] = round(time.perf_counter() - self._start, 3)
        row["it_per_s"] = round((trainer.global_step - self.warmup) / row["steps_s"], 2)
        if module.device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(module.device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(module.device)
        if self.profile_steps:
            with trainer.precision_plugin.forward_context():
                print(
                    f"{row['unit']}: {self.profile_steps} eager steps\n{profile_step(module, self.profile_steps)}"
                )
        print(json.dumps(row), flush=True)


def run_variant(name: str, args: argparse.Namespace, float_model, calibrated, workload, first: bool) -> dict:
    device = next(calibrated.parameters()).device
    config = ReconstructionConfig(
        iters=args.warmup + args.steps,
        batch_size=args.batch_size,
        precision=args.precision,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        checkpoint_every=10**9,
        cuda_graphs=args.cuda_graphs,
        cache_gb=args.cache_gb,
        **VARIANTS[name],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as run_dir:
        reconstructor = Reconstructor(
            copy.deepcopy(calibrated), float_model, workload, config, RunDir(run_dir), only=args.units
        )
        meter = UnitMeter(reconstructor, args.warmup, args.profile_steps if first else 0, count_flops=first)
        reconstructor.callbacks.append(meter)
        start = time.perf_counter()
        reconstructor.run()
        wall = time.perf_counter() - start
    capture = sum(r["capture_s"] for r in meter.rows)
    full_steps = sum(FULL_ITERS / r["it_per_s"] for r in meter.rows)
    return {
        "variant": name,
        "rows": meter.rows,
        "wall_s": round(wall, 1),
        "capture_s": round(capture, 1),
        "steps_s": round(sum(r["steps_s"] for r in meter.rows), 1),
        "full_recipe_h": round((capture + full_steps) / 3600, 3),
        "full_recipe_capture_share": round(capture / (capture + full_steps), 4),
        "peak_gib": max((r.get("peak_gib", 0.0) for r in meter.rows), default=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="t")
    parser.add_argument("--checkpoint", help="trained weights ({'model': state_dict}); default: random init")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--units", nargs="*", default=["image_encoder.trunk.blocks.5", "memory_attention.layers.0"]
    )
    parser.add_argument("--all-units", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["old", "fused"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--cache-gb", type=float, default=None, help="GPU budget per unit cache (default: half free)"
    )
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many eager steps per unit")
    parser.add_argument("--calib-videos", type=int, default=2)
    parser.add_argument("--calib-frames", type=int, default=4)
    parser.add_argument("--calib-images", type=int, default=4)
    parser.add_argument("--objects", type=int, default=None, help="objects tracked per calibration clip")
    parser.add_argument("--data-root", default="data/bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.all_units:
        args.units = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak(device, torch.bfloat16 if args.precision.startswith("bf16") else torch.float32)
    workload = synthetic_workload(
        args.data_root, args.calib_videos, args.calib_frames, args.calib_images, args.image_size, args.objects
    )
    float_model = build_sam2(args.size, args.checkpoint, image_size=args.image_size, device=device)
    calibrated = quantize(copy.deepcopy(float_model), QuantConfig(bits=args.bits))
    with calibration(calibrated):
        workload.run_full(calibrated)
    results = [
        run_variant(name, args, float_model, calibrated, workload, first=i == 0)
        for i, name in enumerate(args.variants)
    ]
    flops = {r["unit"]: r["gflop_per_step"] for r in results[0]["rows"]}
    print(
        f"\nSAM2.1-{args.size} ({'trained' if args.checkpoint else 'random init'}) at {args.image_size} px, "
        f"batch {args.batch_size}, {args.precision}, calibration {args.calib_videos} x {args.calib_frames} "
        f"frames + {args.calib_images} images, {args.steps} timed steps per unit, on {describe_device()}; "
        f"measured matmul peak {peak:.1f} TFLOP/s"
    )
    print(
        "\n| unit | "
        + " | ".join(f"{r['variant']} capture s | {r['variant']} it/s" for r in results)
        + " | GFLOP/step | best TFLOP/s | % of peak |"
    )
    print("|---|" + "---|---|" * len(results) + "---|---|---|")
    for i, row in enumerate(results[0]["rows"]):
        cells = [f"{r['rows'][i]['capture_s']} | {r['rows'][i]['it_per_s']}" for r in results]
        best = max(r["rows"][i]["it_per_s"] for r in results)
        gflop = flops[row["unit"]] or 0.0
        print(
            f"| {row['unit']} | "
            + " | ".join(cells)
            + f" | {gflop} | {gflop * best / 1e3:.1f} | {100 * gflop * best / 1e3 / peak:.1f} |"
        )
    print(
        "\n| variant | run s | capture s | timed steps s | capture share of run | peak GPU GiB | full recipe h | capture share of full recipe |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['wall_s']} | {r['capture_s']} | {r['steps_s']} | "
            f"{100 * r['capture_s'] / r['wall_s']:.1f} % | {r['peak_gib']} | {r['full_recipe_h']} | "
            f"{100 * r['full_recipe_capture_share']:.1f} % |"
        )
    base = results[0]
    for r in results[1:]:
        print(
            f"\n{r['variant']} vs {base['variant']}: capture {base['capture_s'] / max(r['capture_s'], 1e-9):.1f}x faster, "
            f"full recipe {base['full_recipe_h'] / r['full_recipe_h']:.2f}x faster, "
            f"peak GPU memory {r['peak_gib']} against {base['peak_gib']} GiB"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"peak_tflops": peak, "args": vars(args), "results": results}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
