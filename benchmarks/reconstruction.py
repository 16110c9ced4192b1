"""Reconstruction throughput: iterations/s per unit, achieved TFLOP/s against the measured matmul peak, and the
projected wall time of a full run (every unit x 20,000 iterations).

Units are captured from a random-init SAM2 on synthetic calibration data of the requested size, then each is
trained for `--steps` timed steps after `--warmup` steps through the same Lightning fit the pipeline uses.
It/s depends on the per-step batch, not on how many samples the cache holds, so `--all-units` projections may
use a small calibration set while `--units` measures the heaviest units at the paper's calibration size.

    python benchmarks/reconstruction.py --size t --image-size 256 --all-units --steps 5     # CPU smoke test
    python benchmarks/reconstruction.py --size b+ --image-size 1024 --precision bf16-mixed \\
        --units image_encoder.trunk.blocks.12 memory_attention.layers.0 sam_mask_decoder.transformer.layers.0
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import describe_device, synthetic_workload
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from mqsam2.config import ReconstructionConfig
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantize
from mqsam2.reconstruct.driver import Reconstructor, progress_bar
from mqsam2.reconstruct.module import UnitReconstruction
from mqsam2.rundir import RunDir

FULL_ITERS = 20_000


class StepTimer(L.Callback):
    """Wall time of the steps after the warm-up, synchronised with the device at both ends."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.seconds = warmup, None, None

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self._sync(module)
        self.seconds = time.perf_counter() - self.start


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
    batch = module.cache.batch(module.cache.indices(0, module.batch_size, module.seed))
    module.total_loss(*module.loss_terms(batch, module.beta(module.max_steps - 1))).backward()
    module.zero_grad(set_to_none=True)


def step_flops(module: UnitReconstruction) -> int:
    """Forward + backward FLOPs of one training step (matmuls and convolutions, as FlopCounterMode counts)."""
    with FlopCounterMode(display=False) as counter:
        backward_once(module)
    return counter.get_total_flops()


def profile_step(module: UnitReconstruction, steps: int) -> str:
    """The kernels one forward + backward of the unit spends its device time in (eager, so every kernel is
    named): what bounds the step, compute or memory traffic."""
    module.to(module.home_device)  # the Trainer's teardown left it on the CPU
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


def build(args: argparse.Namespace, device: torch.device):
    workload = synthetic_workload(
        args.data_root, args.calib_videos, args.calib_frames, args.calib_images, args.image_size, args.objects
    )
    float_model = build_sam2(args.size, image_size=args.image_size, device=device)
    model = quantize(copy.deepcopy(float_model), QuantConfig(bits=args.bits))
    with calibration(model):
        workload.run_full(model)
    return float_model, model, workload


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    float_model, model, workload = build(args, device)
    config = ReconstructionConfig(
        iters=args.warmup + args.steps,
        batch_size=args.batch_size,
        precision=args.precision,
        accelerator=device.type if device.type == "cpu" else "gpu",
        checkpoint_every=10**9,
    )
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        reconstructor = Reconstructor(
            model, float_model, workload, config, RunDir(run_dir), only=None if args.all_units else args.units
        )
        for unit in reconstructor.units:
            start = time.perf_counter()
            cache = reconstructor.capture(unit)
            capture_seconds = time.perf_counter() - start
            for layer in unit.layers.values():
                layer.weight_quantizer.start_adaround(layer.weight)
            module = UnitReconstruction(
                unit,
                cache,
                max_steps=config.iters,
                drop_prob=config.drop_prob,
                seed=0,
                compile=args.compile,
                cuda_graphs=args.cuda_graphs,
            )
            module.batch_size = config.batch_size
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16")):
                flops = step_flops(module.to(device))
            timer = StepTimer(args.warmup)
            trainer = L.Trainer(
                max_steps=config.iters,
                accelerator=config.accelerator,
                devices=1,
                precision=config.precision,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                callbacks=[timer, progress_bar(config.iters)],
            )
            trainer.fit(module, DataLoader(range(config.iters), batch_size=None))
            if args.profile_steps:
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16")
                ):
                    print(
                        f"{unit.name}: {args.profile_steps} profiled steps\n{profile_step(module, args.profile_steps)}"
                    )
            module.finish()
            it_s = args.steps / timer.seconds
            rows.append(
                {
                    "unit": unit.name,
                    "layers": len(unit.layers),
                    "samples": len(cache),
                    "cache_mib": round(cache.nbytes / 2**20, 1),
                    "capture_s": round(capture_seconds, 2),
                    "it_per_s": round(it_s, 2),
                    "gflop_per_step": round(flops / 1e9, 2),
                    "tflops": round(flops * it_s / 1e12, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="t")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--units", nargs="*", default=["image_encoder.trunk.blocks.5", "memory_attention.layers.0"]
    )
    parser.add_argument("--all-units", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the unit's forward")
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay each step's forward and backward from CUDA graphs (GPU only)",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=0, help="after timing, profile this many eager steps per unit"
    )
    parser.add_argument("--calib-videos", type=int, default=2)
    parser.add_argument("--calib-frames", type=int, default=4)
    parser.add_argument("--calib-images", type=int, default=4)
    parser.add_argument("--objects", type=int, default=None, help="objects tracked per calibration clip")
    parser.add_argument("--data-root", default="data/bench")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak(device, torch.bfloat16 if args.precision.startswith("bf16") else torch.float32)
    rows = measure(args)
    total_hours = sum(FULL_ITERS / r["it_per_s"] for r in rows) / 3600
    print(
        f"\nSAM2.1-{args.size} at {args.image_size} px, batch {args.batch_size}, {args.precision}"
        f"{', compiled' if args.compile else ''}{', CUDA graphs' if args.cuda_graphs and device.type == 'cuda' else ''}, on {describe_device()}"
    )
    print(f"measured matmul peak: {peak:.1f} TFLOP/s")
    print("| unit | layers | samples | cache MiB | capture s | it/s | GFLOP/step | TFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = 100 * r["tflops"] / peak
        print(
            f"| {r['unit']} | {r['layers']} | {r['samples']} | {r['cache_mib']} | {r['capture_s']} | "
            f"{r['it_per_s']} | {r['gflop_per_step']} | {r['tflops']} | {share:.1f} |"
        )
    print(f"\nprojected: {len(rows)} units x {FULL_ITERS} iterations = {total_hours:.2f} h")
    if args.json:
        args.json.write_text(
            json.dumps({"peak_tflops": peak, "rows": rows, "projected_hours": total_hours}, indent=1)
        )


if __name__ == "__main__":
    main()
