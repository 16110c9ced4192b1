"""Deployed inference: the exported W8A8, Avg-4 and Avg-6 models on real integer kernels against bf16,
bf16 + torch.compile of the image encoder, and sam2's vos_optimized recipe (the whole tracker compiled) of
the same SAM2.1 model, side by side in one process.

The quantized models come through the product's own path: importance on synthetic calibration clips, the
exact ILP for Avg-4 (candidates 3, 4, 5) and Avg-6 (5, 6, 7), uniform 8 bits for W8A8, quantize + calibration
(MinMax observers), `export_model` to a temporary directory, `load_export`, then `mqsam2.deploy.deploy`.
A plain name (`avg4`) deploys as before: <= 4-bit Linear layers on tinygemm int4, 5-8-bit ones on torchao
int8 dynamic, the image encoder compiled. `+vos` (`avg4+vos`) deploys with the calibrated activation steps
on fp8 / int8 GEMMs (`DeployConfig(activations="calibrated")`, `mqsam2.deploy.integer`) and compiles the
whole tracker as sam2's vos_optimized predictor does (`mqsam2.deploy.compiled.compile_tracker`); the float
row `bf16+vos` is that recipe on the float model. Weights are a seeded random init: speed, memory and
fidelity to the source model are meaningful, accuracy is not.

Per row: image-encoder images/s per `--batch` (warm-up, then `--repeats` timed calls, synchronised), video
frames/s with sam2's protocol (one object prompted on frame 0 of a `--frames` synthetic clip, bf16 autocast
on CUDA (the CPU smoke run stays fp32), one warm-up run, then `--video-runs` timed `propagate_in_video` runs),
peak GPU memory of each (NaN on CPU), bytes of all weights and buffers held (`weight_nbytes`), the file on
disk (the export; the fp32 checkpoint for float rows), and fidelity: relative error of the image embedding
against the row's source (the fake-quant export run in fp32 for quantized rows, bf16 eager for float rows)
and against bf16 eager, the mean mask IoU (J) of the clip against bf16 eager, and for quantized rows against
the fake-quant model's own clip under the same autocast. Image rates compare with the best of bf16,
bf16+compile and bf16+vos (which compiles the same image encoder), video rates with bf16+vos (when
measured), memory and weights with bf16. `--profile-dir` writes, for the rows `--profile` names (every row by
default), torch.profiler's top kernels of one encoder call and of the clip's last `--profile-frames` frames,
with the wall time (under the profiler, and timed without it) beside the summed GPU kernel time (timed and
kernel time close: GPU-bound; far apart: launch- or CPU-bound).

Rows run in `--variants` order, each on its own float build (same seed, same weights) or its own export,
with the device to itself. Every row is printed, with the seconds of each phase, and `--json` is rewritten as soon as a
row is measured (`"complete": false` until the last), so a run cut off by a timeout keeps its finished rows;
`--report FILE...` prints the table of saved rows (several files: one table, later rows of a variant win).

    python benchmarks/inference.py --size t --image-size 64 --frames 4 --repeats 2      # CPU: fp32, no compile
    TQDM_DISABLE=1 python benchmarks/inference.py --size b+ --image-size 1024 --frames 200 --json inference.json
    python benchmarks/inference.py --report call1/inference.json call2/inference.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from common import describe_device, synthetic_workload

from mqsam2 import api
from mqsam2.allocation import allocate
from mqsam2.data.stream import SyntheticStream
from mqsam2.deploy import DeployConfig, deploy, weight_nbytes
from mqsam2.deploy.compiled import compile_tracker
from mqsam2.export import export_model, load_export
from mqsam2.export.card import float_checkpoint_bytes
from mqsam2.memory import Prompt
from mqsam2.metrics import region_similarity
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig
from mqsam2.workload import Workload

FLOAT_VARIANTS = ("bf16", "bf16+compile", "bf16+vos")
QUANT_VARIANTS = {"w8a8": None, "avg4": (4, (3, 4, 5)), "avg6": (6, (5, 6, 7))}  # (target bits, candidates)
VARIANTS = (*FLOAT_VARIANTS, *QUANT_VARIANTS, *(f"{name}+vos" for name in QUANT_VARIANTS))
COMPILED = ("bf16+compile", "bf16+vos")  # rows that need a compile mode
IMAGE_BASELINES = ("bf16", "bf16+compile", "bf16+vos")  # bf16+vos compiles the image encoder as bf16+compile


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
            importance = api.measure_importance(float_model, workload, QuantConfig())
        target, candidates = QUANT_VARIANTS[name]
        allocation = allocate(importance, target_avg=target, candidates=candidates)
        description = (
            f"ILP {allocation.average_bits:.3f} avg bits, layers per width {allocation.layers_per_width}"
        )
        configs[name] = (QuantConfig(plan=allocation.plan), description)
    return configs


def make_export(float_model, config: QuantConfig, workload: Workload, path: Path) -> None:
    export_model(api.quantize_calibrated(float_model, config, workload), path)


@torch.inference_mode()
def embedding(
    model, images: torch.Tensor, autocast: Callable[[], AbstractContextManager] = nullcontext
) -> torch.Tensor:
    with autocast():
        return model.image_encoder(images)["vision_features"].float().cpu()


def relative_error(value: torch.Tensor, reference: torch.Tensor | None) -> float:
    if reference is None:
        return math.nan
    return float((value - reference).norm() / reference.norm())


def start_clip(model, stream: SyntheticStream, video_size) -> dict:
    """An inference state over the stream with object 1 prompted by its mask on frame 0."""
    state = model.init_state_from_frames(stream[0][None], video_size)
    state["images"], state["num_frames"] = stream, len(stream)  # frames by index, on demand
    model.add_prompt(state, 1, Prompt.from_mask(0, stream.mask(0).cpu()))
    return state


@torch.inference_mode()
def clip_masks(model, bench: Bench, stream: SyntheticStream, video_size) -> torch.Tensor:
    with bench.autocast():
        state = start_clip(model, stream, video_size)
        return torch.stack([logits[0, 0] > 0 for _, _, logits in model.propagate_in_video(state)]).cpu()


def profile(run: Callable[[], None], bench: Bench, path: Path, title: str, timed_ms: float) -> None:
    """torch.profiler's top 25 kernels of one `run`, headed by its wall time under the profiler, its timed
    wall time without it and its summed device kernel time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    bench.sync()
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        run()
        bench.sync()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    # kernels only: a CPU op's device time is its kernels' again
    device_us = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
    sort = "self_cuda_time_total" if bench.cuda else "self_cpu_time_total"
    with open(path, "a") as out:
        out.write(
            f"## {title}: wall {1e3 * wall:.1f} ms under the profiler ({timed_ms:.1f} ms timed without it), "
            f"summed device kernel time {device_us / 1e3 if bench.cuda else math.nan:.1f} ms\n"
        )
        out.write(events.table(sort_by=sort, row_limit=25) + "\n\n")


class Phases:
    """Seconds per phase of one row: where a row's time goes (model, compile, timing, profiling)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 1) for name, seconds in self.seconds.items()}


def measure(
    model,
    bench: Bench,
    args: argparse.Namespace,
    stream: SyntheticStream,
    video_size,
    name: str,
    phases: Phases,
) -> dict:
    """Image-encoder rates and peaks per batch size, then the clip: frames/s, peak, and the warm-up's masks.
    Compiled rows compile inside their first calls: in "image" for the encoder, in "video" for the rest."""
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
        phases.lap("image")
        state = start_clip(model, stream, video_size)
        row["masks"] = torch.stack(
            [logits[0, 0] > 0 for _, _, logits in model.propagate_in_video(state)]
        ).cpu()

        def clip() -> None:
            for _ in model.propagate_in_video(state):
                pass

        seconds, peak = bench.timed(clip, args.video_runs)
        phases.lap("video")
        if args.profile_dir is not None and name in args.profile:
            path = args.profile_dir / f"profile_{name.replace('+', '_')}.txt"
            path.unlink(missing_ok=True)
            one = 1e3 / row["img_s_b1"] if "img_s_b1" in row else math.nan
            profile(lambda: model.image_encoder(stream[0][None]), bench, path, "image encoder, batch 1", one)
            frames = min(args.profile_frames, len(stream))
            start = len(stream) - frames  # the last frames: the memory bank is full

            def tail() -> None:
                for _ in model.propagate_in_video(state, start, frames - 1):
                    pass

            title = f"tracking frames {start}-{len(stream) - 1}"
            profile(tail, bench, path, title, 1e3 * seconds * frames / len(stream))
            phases.lap("profile")
    row["video_fps"] = len(stream) / seconds
    row["video_peak_mib"] = peak
    row["weight_bytes"] = weight_nbytes(model)
    return row


def write_exports(float_model, workload: Workload, variants: list[str], directory: Path) -> dict[str, tuple]:
    """{variant: (export path, plan description)}, each made by the product's path and written to disk."""
    exports = {}
    start = time.perf_counter()
    bases = list(dict.fromkeys(v.removesuffix("+vos") for v in variants))  # avg4 and avg4+vos: one export
    for name, (config, description) in quant_configs(float_model, workload, bases).items():
        exports[name] = (directory / f"{name}.mq", description)
        make_export(float_model, config, workload, exports[name][0])
        gc.collect()
        print(f"exported {name} ({description}) at {time.perf_counter() - start:.0f} s", flush=True)
    return exports


def run_row(
    name: str, prepare: Callable[[Phases], tuple], bench: Bench, args, stream, video_size, reference: dict
) -> dict:
    """One table row; `prepare(phases)` gives (model, the embedding its fidelity is measured against, row
    fields). A failing variant is reported in its row and the others still run."""
    phases = Phases()
    row = {"variant": name}
    try:
        model, source, fields = prepare(phases)
        row |= fields
        source_masks = row.pop("source_masks", None)
        measured = measure(model, bench, args, stream, video_size, name, phases)
        model = None
        embedding, masks = measured.pop("embedding"), measured.pop("masks")
        row["emb_err_source"] = relative_error(embedding, source)
        row["emb_err_bf16"] = relative_error(embedding, reference["embedding"])
        row["j_bf16"] = float(region_similarity(masks, reference["masks"]).mean())
        row["j_source"] = (
            float(region_similarity(masks, source_masks).mean()) if source_masks is not None else math.nan
        )
        row |= measured
        phases.lap("fidelity")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        phases.lap("failed")
    row["phase_s"] = phases.rounded()
    row["seconds"] = round(sum(phases.seconds.values()), 1)
    print(json.dumps(row), flush=True)
    return row


def run(args: argparse.Namespace, on_row: Callable[[list[dict], dict], None]) -> list[dict]:
    """Every row of `args.variants` in order; `on_row(rows, setup seconds)` after each."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(device)
    if bench.cuda:  # as sam2's benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_mode = args.compile_mode or ("default" if bench.cuda else "none")
    if args.inductor_tuning:
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
    variants = [v for v in dict.fromkeys(args.variants) if not (v in COMPILED and compile_mode == "none")]
    video_size = (args.image_size * 3 // 4, args.image_size)
    stream = SyntheticStream(args.frames, args.image_size, video_size, device)
    setup = Phases()
    workload = synthetic_workload(
        args.data_root, args.calib_videos, args.calib_frames, args.calib_images, args.image_size, objects=1
    )

    def build_float() -> torch.nn.Module:
        """The seeded float build (seconds): each float row gets its own, so no other model's weights or
        caches sit in its peak memory."""
        return build_sam2(args.size, image_size=args.image_size, seed=args.seed, device=device)

    float_model = build_float()
    float_fields = {
        "kernels": "bf16 autocast" if bench.cuda else "fp32",
        "file_bytes": float_checkpoint_bytes(float_model),
    }
    setup.lap("build")
    # the fidelity reference, bf16 eager, whichever rows run
    reference = {
        "embedding": embedding(float_model, stream[0][None], bench.autocast),
        "masks": clip_masks(float_model, bench, stream, video_size),
    }
    setup.lap("reference")
    rows: list[dict] = []
    # per export: its fake-quant embedding and clip, shared by avg4 and avg4+vos
    sources: dict[str, tuple] = {}

    def float_row(name: str, phases: Phases) -> tuple:
        model = build_float()
        if name == "bf16+compile":
            compile_image_encoder(model, compile_mode)
        if name == "bf16+vos":  # the recipe compiles every part
            compile_tracker(model, compile_mode)
        phases.lap("model")
        return model, reference["embedding"], float_fields

    def quant_row(name: str, phases: Phases) -> tuple:
        base, vos = name.removesuffix("+vos"), name.endswith("+vos")
        path, plan = exports[base]
        model = load_export(path, device=device)
        phases.lap("model")
        if base not in sources:  # the export's own semantics: fake-quant, fp32 eager; its clip, same autocast
            sources[base] = (embedding(model, stream[0][None]), clip_masks(model, bench, stream, video_size))
            phases.lap("source")
        source, source_masks = sources[base]
        activations = "calibrated" if vos else "dynamic"
        deploy(model, DeployConfig(int4_max_bits=args.int4_max_bits, activations=activations))
        report = model.mqsam2_deploy_report
        free(bench)
        if compile_mode != "none":
            compile_tracker(model, compile_mode) if vos else compile_image_encoder(model, compile_mode)
        phases.lap("deploy")
        kernels = " / ".join(f"{kernel} {n}" for kernel, n in sorted(report.counts().items()))
        fields = {
            "kernels": kernels,
            "plan": plan,
            "deploy": report.summary(),
            "file_bytes": path.stat().st_size,
            "source_masks": source_masks,
        }
        return model, source, fields

    with tempfile.TemporaryDirectory() as tmp:
        exports = write_exports(float_model, workload, variants, Path(tmp))
        float_model = None  # every row has the device to itself
        setup.lap("exports")
        print(f"setup {json.dumps(setup.rounded())}", flush=True)
        start = time.perf_counter()
        for name in variants:
            free(bench)
            print(f"[{time.perf_counter() - start:.0f} s into the rows] {name}", flush=True)
            prepare = float_row if name in FLOAT_VARIANTS else quant_row
            rows.append(
                run_row(
                    name, lambda ph, n=name, p=prepare: p(n, ph), bench, args, stream, video_size, reference
                )
            )
            on_row(rows, setup.rounded())
        free(bench)
    return rows


def ratio(value: float, ref: float) -> str:
    return f"{value / ref:.2f}x" if ref and not math.isnan(ref) and not math.isnan(value) else "-"


def number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def field(row: dict, key: str) -> float:
    """A row's number, NaN where it lacks one (a batch size another call measured, a field an older run lacked)."""
    return row.get(key, math.nan)


def best_float(rows: list[dict], key: str, names: tuple[str, ...]) -> float:
    """The best (highest) value of `key` among the measured float rows named."""
    values = [field(r, key) for r in rows if r["variant"] in names and "error" not in r]
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def table(rows: list[dict], batches: list[int]) -> str:
    """Image rates against the best of bf16, bf16+compile and bf16+vos, video against bf16+vos (else the best
    float row), memory and weights against bf16 (else the first float row, as the header says)."""
    measured = [r for r in rows if "error" not in r]
    # the memory and weights reference: bf16, else the first float row, else the first row
    bf16 = min(
        measured, key=lambda r: (r["variant"] != "bf16", r["variant"] not in FLOAT_VARIANTS), default=None
    )
    if bf16 is None:
        return "\n".join(f"| {r['variant']} | failed: {r['error']} |" for r in rows)
    video_ref = best_float(measured, "video_fps", ("bf16+vos",))
    if math.isnan(video_ref):
        video_ref = best_float(measured, "video_fps", FLOAT_VARIANTS)
    head = ["variant", "kernels"]
    for b in batches:
        head += [f"img/s b{b}", "vs best bf16", f"peak MiB b{b}", f"vs {bf16['variant']}"]
    head += ["video fps", "vs bf16+vos", "video peak MiB", f"vs {bf16['variant']}", "weights MB"]
    head += [f"vs {bf16['variant']}", "file MB"]
    head += ["emb err vs source", "emb err vs bf16", "J vs bf16", "J vs source", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |")
            continue
        cells = [r["variant"], r["kernels"]]
        for b in batches:
            best = best_float(measured, f"img_s_b{b}", IMAGE_BASELINES)
            cells += [number(field(r, f"img_s_b{b}"), ".2f"), ratio(field(r, f"img_s_b{b}"), best)]
            peak = field(r, f"peak_mib_b{b}")
            cells += [number(peak, ".0f"), ratio(peak, field(bf16, f"peak_mib_b{b}"))]
        cells += [number(r["video_fps"], ".2f"), ratio(r["video_fps"], video_ref)]
        cells += [number(r["video_peak_mib"], ".0f"), ratio(r["video_peak_mib"], bf16["video_peak_mib"])]
        cells += [f"{r['weight_bytes'] / 1e6:.1f}", ratio(r["weight_bytes"], bf16["weight_bytes"])]
        cells += [f"{r['file_bytes'] / 1e6:.1f}"]
        cells += [
            number(field(r, k), ".4f") for k in ("emb_err_source", "emb_err_bf16", "j_bf16", "j_source")
        ]
        cells += [number(field(r, "seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def saved_rows(paths: list[Path]) -> list[dict]:
    """The rows of several `--json` files in order; a variant's later row replaces its earlier one (in its
    place)."""
    rows: dict[str, dict] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            rows[row["variant"]] = row
    return list(rows.values())


def batches_of(rows: list[dict]) -> list[int]:
    return sorted({int(key[len("img_s_b") :]) for row in rows for key in row if key.startswith("img_s_b")})


def write_json(path: Path, args: argparse.Namespace, rows: list[dict], setup: dict, complete: bool) -> None:
    """Written aside and renamed, so a timeout's kill never leaves half a file."""
    saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    text = json.dumps({"args": saved, "setup_s": setup, "complete": complete, "rows": rows}, indent=1)
    aside = path.with_name(path.name + ".part")
    aside.write_text(text)
    aside.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="b+", help="SAM2.1 size: t, s, b+, l (random init)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="rows, in order"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="image-encoder batch sizes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed image-encoder calls per batch size")
    parser.add_argument("--repeats", type=int, default=20, help="timed image-encoder calls per batch size")
    parser.add_argument("--frames", type=int, default=200, help="clip length (sam2's protocol: 200)")
    parser.add_argument("--video-runs", type=int, default=1, help="timed clip runs after one warm-up run")
    parser.add_argument(
        "--compile-mode",
        choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode of the compiled rows (default: default on CUDA, none on CPU; sam2's "
        "vos_optimized uses max-autotune)",
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
    parser.add_argument("--json", type=Path, help="also write the rows here, rewritten after each row")
    parser.add_argument(
        "--profile-dir", type=Path, help="write the profiled rows' torch.profiler tables here"
    )
    parser.add_argument(
        "--profile", nargs="+", choices=VARIANTS, help="the rows to profile (default: every row)"
    )
    parser.add_argument(
        "--profile-frames",
        type=int,
        default=16,
        help="clip frames profiled, the last ones (the profiler's Python parse of a whole clip's trace takes "
        "longer than the clip)",
    )
    parser.add_argument(
        "--report", type=Path, nargs="+", help="print the table of these --json files and stop"
    )
    args = parser.parse_args()
    if args.report:
        rows = saved_rows(args.report)
        print(f"rows of {', '.join(map(str, args.report))}")
        print(table(rows, batches_of(rows)))
        return
    args.profile = args.profile or args.variants
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"SAM2.1-{args.size} random init at {args.image_size} px, {args.frames}-frame clip, {describe_device()}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    saved = {"setup": {}}

    def on_row(rows: list[dict], setup: dict) -> None:
        saved["setup"] = setup
        if args.json:
            write_json(args.json, args, rows, setup, complete=False)

    rows = run(args, on_row)
    print(table(rows, args.batch))
    if args.json:
        write_json(args.json, args, rows, saved["setup"], complete=True)


if __name__ == "__main__":
    main()
