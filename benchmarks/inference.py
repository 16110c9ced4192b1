"""Deployed inference: the exported W8A8, Avg-4 and Avg-6 models on real integer kernels against bf16 and
bf16 + torch.compile of the same SAM2.1 model, side by side in one process.

The quantized models come through the product's own path: importance on synthetic calibration clips, the
exact ILP for Avg-4 (candidates 3, 4, 5) and Avg-6 (5, 6, 7), uniform 8 bits for W8A8, quantize + calibration
(MinMax observers), `export_model` to a temporary directory, `load_export`, then `mqsam2.deploy.deploy`
(<= 4-bit Linear layers on tinygemm int4, 5-8-bit ones on torchao int8 dynamic; docs/export.md). Weights are a
seeded random init: speed, memory and fidelity to the source model are meaningful, accuracy is not.

Per row: image-encoder images/s per `--batch` (warm-up, then `--repeats` timed calls, synchronised), video
frames/s with sam2's protocol (one object prompted on frame 0 of a `--frames` synthetic clip, bf16 autocast
on CUDA (the CPU smoke run stays fp32), one warm-up run, then `--video-runs` timed `propagate_in_video` runs), peak GPU memory of each (NaN on CPU),
bytes of all weights and buffers held (`weight_nbytes`), the file on disk (the export; the fp32 checkpoint for
float rows), and fidelity: relative error of the image embedding against the row's source (the fake-quant
export run in fp32 for quantized rows, bf16 eager for float rows) and against bf16 eager, and the mean mask
IoU (J) of the clip against bf16 eager. Ratios are against `bf16+compile` (or `bf16` when compile is off).
As sam2 does, torch.compile covers the image encoder (fullgraph, static shapes); the tracker runs eager.

    python benchmarks/inference.py --size t --image-size 64 --frames 4 --repeats 2      # CPU: fp32, no compile
    TQDM_DISABLE=1 python benchmarks/inference.py --size b+ --image-size 1024 --frames 200 --json inference.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from common import describe_device, synthetic_workload

from mqsam2.allocation import allocate
from mqsam2.data.stream import SyntheticStream
from mqsam2.deploy import DeployConfig, deploy, weight_nbytes
from mqsam2.export import export_model, load_export
from mqsam2.export.card import float_checkpoint_bytes
from mqsam2.importance import ImportanceCollector
from mqsam2.memory import Prompt
from mqsam2.metrics import region_similarity
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantizable_layers, quantize
from mqsam2.workload import Workload

FLOAT_VARIANTS = ("bf16", "bf16+compile")
QUANT_VARIANTS = {"w8a8": None, "avg4": (4, (3, 4, 5)), "avg6": (6, (5, 6, 7))}  # (target bits, candidates)
VARIANTS = (*FLOAT_VARIANTS, *QUANT_VARIANTS)


class Bench:
    """Device, autocast and timing helpers shared by every row."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def autocast(self):
        """bf16 autocast on CUDA, as sam2 runs; the CPU smoke run stays fp32 (CPU bf16 is slow here)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else math.nan

    def timed(self, run: Callable[[], None], repeats: int) -> tuple[float, float]:
        """(seconds per repeat, peak MiB) of `run` after the caller's warm-up."""
        self.sync()
        self.reset_peak()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        self.sync()
        return (time.perf_counter() - start) / repeats, self.peak_mib()


def free(bench: Bench) -> None:
    torch._dynamo.reset()
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()


def compile_image_encoder(model: torch.nn.Module, mode: str) -> None:
    """What sam2's `compile_image_encoder` does (fullgraph, static shapes), with the mode as an option."""
    model.image_encoder.forward = torch.compile(
        model.image_encoder.forward, mode=mode, fullgraph=True, dynamic=False
    )


def quant_configs(float_model, workload: Workload, variants: list[str]) -> dict[str, tuple[QuantConfig, str]]:
    """{variant: (QuantConfig, description)}: importance + exact ILP for the mixed variants, 8 bits for W8A8."""
    configs = {}
    importance = None
    for name in variants:
        if name not in QUANT_VARIANTS:
            continue
        if QUANT_VARIANTS[name] is None:
            configs[name] = (QuantConfig(bits=8), "W8A8 uniform")
            continue
        if importance is None:
            layers = quantizable_layers(float_model)
            with ImportanceCollector(float_model, layers) as collector:
                workload.run_full(float_model)
            importance = collector.compute()
        target, candidates = QUANT_VARIANTS[name]
        allocation = allocate(importance, target_avg=target, candidates=candidates)
        description = (
            f"ILP {allocation.average_bits:.3f} avg bits, layers per width {allocation.layers_per_width}"
        )
        configs[name] = (QuantConfig(plan=allocation.plan), description)
    return configs


def make_export(float_model, config: QuantConfig, workload: Workload, path: Path) -> None:
    model = quantize(copy.deepcopy(float_model), config)
    with calibration(model):
        workload.run_full(model)
    export_model(model, path)


@torch.inference_mode()
def embedding(model, images: torch.Tensor) -> torch.Tensor:
    return model.image_encoder(images)["vision_features"].float().cpu()


def relative_error(value: torch.Tensor, reference: torch.Tensor | None) -> float:
    if reference is None:
        return math.nan
    return float((value - reference).norm() / reference.norm())


def measure(model, bench: Bench, args: argparse.Namespace, stream: SyntheticStream, video_size) -> dict:
    """Image-encoder rates and peaks per batch size, then the clip: frames/s, peak, and the warm-up's masks."""
    row: dict = {}
    with torch.inference_mode(), bench.autocast():
        row["embedding"] = model.image_encoder(stream[0][None])["vision_features"].float().cpu()
        for batch in args.batch:
            images = torch.stack([stream[i % len(stream)] for i in range(batch)])
            for _ in range(args.warmup):
                model.image_encoder(images)
            seconds, peak = bench.timed(lambda images=images: model.image_encoder(images), args.repeats)
            row[f"img_s_b{batch}"] = batch / seconds
            row[f"peak_mib_b{batch}"] = peak
        state = model.init_state_from_frames(stream[0][None], video_size)
        state["images"], state["num_frames"] = stream, len(stream)  # frames by index, on demand
        model.add_prompt(state, 1, Prompt.from_mask(0, stream.mask(0).cpu()))
        row["masks"] = torch.stack(
            [logits[0, 0] > 0 for _, _, logits in model.propagate_in_video(state)]
        ).cpu()

        def clip() -> None:
            for _ in model.propagate_in_video(state):
                pass

        seconds, peak = bench.timed(clip, args.video_runs)
    row["video_fps"] = len(stream) / seconds
    row["video_peak_mib"] = peak
    row["weight_bytes"] = weight_nbytes(model)
    return row


def write_exports(float_model, workload: Workload, variants: list[str], directory: Path) -> dict[str, tuple]:
    """{variant: (export path, plan description)}, each made by the product's path and written to disk."""
    exports = {}
    start = time.perf_counter()
    for name, (config, description) in quant_configs(float_model, workload, variants).items():
        exports[name] = (directory / f"{name}.mq", description)
        make_export(float_model, config, workload, exports[name][0])
        gc.collect()
        print(f"exported {name} ({description}) at {time.perf_counter() - start:.0f} s", flush=True)
    return exports


def run_row(
    name: str, prepare: Callable[[], tuple], bench: Bench, args, stream, video_size, reference
) -> dict:
    """One table row; `prepare()` gives (model, the embedding its fidelity is measured against, row fields).
    A failing variant is reported in its row and the others still run."""
    start = time.perf_counter()
    row = {"variant": name}
    try:
        model, source, fields = prepare()
        row |= fields
        measured = measure(model, bench, args, stream, video_size)
        model = None
        embedding, masks = measured.pop("embedding"), measured.pop("masks")
        if name == "bf16":
            reference |= {"embedding": embedding, "masks": masks}
        row["emb_err_source"] = relative_error(embedding, source)
        row["emb_err_bf16"] = relative_error(embedding, reference.get("embedding"))
        row["j_bf16"] = (
            float(region_similarity(masks, reference["masks"]).mean()) if "masks" in reference else math.nan
        )
        row |= measured
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(device)
    if bench.cuda:  # as sam2's benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_mode = args.compile_mode or ("default" if bench.cuda else "none")
    if args.inductor_tuning:
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
    variants = [
        v for v in VARIANTS if v in args.variants and not (v == "bf16+compile" and compile_mode == "none")
    ]
    video_size = (args.image_size * 3 // 4, args.image_size)
    stream = SyntheticStream(args.frames, args.image_size, video_size, device)
    workload = synthetic_workload(
        args.data_root, args.calib_videos, args.calib_frames, args.calib_images, args.image_size, objects=1
    )
    float_model = build_sam2(args.size, image_size=args.image_size, seed=args.seed, device=device)
    float_fields = {
        "kernels": "bf16 autocast" if bench.cuda else "fp32",
        "file_bytes": float_checkpoint_bytes(float_model),
    }
    rows, reference = [], {}

    def float_row(name: str) -> tuple:
        if name == "bf16+compile":
            compile_image_encoder(float_model, compile_mode)
        return float_model, reference.get("embedding"), float_fields

    def quant_row(name: str) -> tuple:
        path, plan = exports[name]
        model = load_export(path, device=device)
        source = embedding(model, stream[0][None])  # the export's own semantics: fake-quant, fp32, eager
        deploy(model, DeployConfig(int4_max_bits=args.int4_max_bits))
        report = model.mqsam2_deploy_report
        free(bench)
        if compile_mode != "none":
            compile_image_encoder(model, compile_mode)
        kernels = " / ".join(f"{kernel} {n}" for kernel, n in sorted(report.counts().items()))
        fields = {
            "kernels": kernels,
            "plan": plan,
            "deploy": report.summary(),
            "file_bytes": path.stat().st_size,
        }
        return model, source, fields

    with tempfile.TemporaryDirectory() as tmp:
        exports = write_exports(float_model, workload, variants, Path(tmp))
        for name in variants:
            if name not in FLOAT_VARIANTS:
                float_model = None  # every quantized row has the device to itself
            free(bench)
            prepare = float_row if name in FLOAT_VARIANTS else quant_row
            rows.append(
                run_row(name, lambda n=name, p=prepare: p(n), bench, args, stream, video_size, reference)
            )
        free(bench)
    return rows


def ratio(value: float, ref: float) -> str:
    return f"{value / ref:.2f}x" if ref and not math.isnan(ref) and not math.isnan(value) else "-"


def number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def table(rows: list[dict], batches: list[int]) -> str:
    measured = [r for r in rows if "error" not in r]
    ref = next((r for r in measured if r["variant"] == "bf16+compile"), None) or next(
        (r for r in measured if r["variant"] == "bf16"), None
    )
    head = ["variant", "kernels"]
    for b in batches:
        head += [f"img/s b{b}", "vs ref", f"peak MiB b{b}", "vs ref"]
    head += ["video fps", "vs ref", "video peak MiB", "vs ref", "weights MB", "vs ref", "file MB"]
    head += ["emb err vs source", "emb err vs bf16", "J vs bf16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |")
            continue
        cells = [r["variant"], r["kernels"]]
        for b in batches:
            for key, spec in ((f"img_s_b{b}", ".2f"), (f"peak_mib_b{b}", ".0f")):
                cells += [number(r[key], spec), ratio(r[key], ref[key])]
        cells += [number(r["video_fps"], ".2f"), ratio(r["video_fps"], ref["video_fps"])]
        cells += [number(r["video_peak_mib"], ".0f"), ratio(r["video_peak_mib"], ref["video_peak_mib"])]
        cells += [f"{r['weight_bytes'] / 1e6:.1f}", ratio(r["weight_bytes"], ref["weight_bytes"])]
        cells += [f"{r['file_bytes'] / 1e6:.1f}"]
        cells += [number(r[k], ".4f") for k in ("emb_err_source", "emb_err_bf16", "j_bf16")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="b+", help="SAM2.1 size: t, s, b+, l (random init)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="image-encoder batch sizes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed image-encoder calls per batch size")
    parser.add_argument("--repeats", type=int, default=20, help="timed image-encoder calls per batch size")
    parser.add_argument("--frames", type=int, default=200, help="clip length (sam2's protocol: 200)")
    parser.add_argument("--video-runs", type=int, default=1, help="timed clip runs after one warm-up run")
    parser.add_argument(
        "--compile-mode",
        choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode of the image encoder (default: default on CUDA, none on CPU)",
    )
    parser.add_argument(
        "--int4-max-bits", type=int, default=4, help="DeployConfig.int4_max_bits (0: int8 only)"
    )
    parser.add_argument(
        "--inductor-tuning",
        action="store_true",
        help="torchao's recommended Inductor settings, for every row",
    )
    parser.add_argument("--calib-videos", type=int, default=1)
    parser.add_argument("--calib-frames", type=int, default=4)
    parser.add_argument("--calib-images", type=int, default=2)
    parser.add_argument("--data-root", default="data/bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    print(
        f"SAM2.1-{args.size} random init at {args.image_size} px, {args.frames}-frame clip, {describe_device()}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    rows = run(args)
    print(table(rows, args.batch))
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
