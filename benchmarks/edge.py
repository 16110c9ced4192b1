"""Edge deployment: the quantized SAM2.1 image predictor exported to ONNX (QDQ + integer codes) and run by
ONNX Runtime on the CPU, against the fp32 ONNX export of the same model, side by side in one process.

Per image size, every variant goes through the product's path: quantize (uniform 8 bits for W8A8; for Avg-6
and Avg-4 the layer importance of the image predictor's layers on synthetic calibration images and the exact
ILP over candidates {5, 6, 7} and {3, 4, 5}), calibrate (MinMax) on the same images with box prompts, then
`mqsam2.deploy.onnx.export_image_predictor`. `avg4-int4` is the Avg-4 model written with its 2-4-bit Linear
layers as MatMulNBits (`low_bit_kernel="int4"`) instead of int8 QDQ.

Speed: one warm-up call per session, then `--repeats` rounds; each round runs every variant's encoder once on
the same image (interleaved, so load from other processes spreads over all variants); the table gives the
median (and the minimum) seconds per image and the speed ratio to fp32 from each. The decoder: a box prompt,
median over the rounds. Memory: the peak resident memory that loading the two sessions and running them
once adds to a fresh process (spawned per variant). Size: encoder.onnx + decoder.onnx on disk. Fidelity: mask IoU of the
ONNX masks against the PyTorch fake-quant model's (box prompts on held-out synthetic images), and the relative
error of the image embedding against the fake-quant model's.

    PYTHONPATH=src python benchmarks/edge.py --image-sizes 512 1024
    PYTHONPATH=src python benchmarks/edge.py --image-sizes 512 --checkpoint /work/shared/models/sam21t_512_synth.pt
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import describe_device

from mqsam2 import api
from mqsam2.allocation import allocate
from mqsam2.data import calibration_set, ensure_synth
from mqsam2.deploy.fidelity import mask_fidelity, onnx_box_predictor, prompt_sets, torch_box_predictor
from mqsam2.deploy.onnx import OnnxExportConfig, OnnxImagePredictor, export_image_predictor
from mqsam2.deploy.onnx.runtime import peak_memory_mib, profile_encoder
from mqsam2.models import build_sam2, image_features
from mqsam2.quant import QuantConfig
from mqsam2.workload import Workload

PLANS = {"avg6": (6, (5, 6, 7)), "avg4": (4, (3, 4, 5))}  # (target bits, candidates)
VARIANTS = ("fp32", "w8a8", "avg6", "avg4", "avg4-int4")


def quant_config(
    name: str, float_model, workload: Workload, importance_cache: dict
) -> tuple[QuantConfig, str]:
    """The variant's QuantConfig and a one-line description of its plan."""
    if name == "w8a8":
        return QuantConfig(bits=8), "uniform 8 bits"
    if "importance" not in importance_cache:  # images only: the layers they reach are the image predictor's
        importance_cache["importance"] = api.measure_importance(float_model, workload, QuantConfig())
    target, candidates = PLANS[name.split("-")[0]]
    allocation = allocate(importance_cache["importance"], target_avg=target, candidates=candidates)
    description = (
        f"ILP {allocation.average_bits:.2f} avg bits, layers per width {allocation.layers_per_width}"
    )
    return QuantConfig(plan=allocation.plan), description


def build_variants(args, image_size: int, directory: Path, workload: Workload, held_out) -> list[dict]:
    """Export every variant into `directory`; rows carry the paths, plans and fidelity against fake-quant."""
    float_model = build_sam2(args.size, checkpoint=args.checkpoint, image_size=image_size, video=False)
    rows, cache, quantized = [], {}, {}
    image = held_out[0].image
    for name in args.variants:
        start = time.perf_counter()
        row = {"image_size": image_size, "variant": name}
        if name == "fp32":
            model, row["plan"] = float_model, "float"
        else:
            base = name.split("-")[0]
            if base not in quantized:
                config, description = quant_config(base, float_model, workload, cache)
                quantized[base] = (api.quantize_calibrated(float_model, config, workload), description)
            model, row["plan"] = quantized[base]
        kernel = "int4" if name.endswith("-int4") else "int8"
        export = export_image_predictor(model, directory / name, OnnxExportConfig(low_bit_kernel=kernel))
        row |= {"dir": str(directory / name), "kernels": export.layers.counts(), "file_bytes": export.nbytes}
        predictor = OnnxImagePredictor(directory / name, threads=args.threads)
        with torch.inference_mode():
            reference_embedding = image_features(model, image[None])[0].numpy()
        embedding = predictor.encode(image)["image_embed"]
        row["emb_err_fakequant"] = float(
            np.linalg.norm(embedding - reference_embedding) / np.linalg.norm(reference_embedding)
        )
        fidelity = mask_fidelity(torch_box_predictor(model), onnx_box_predictor(predictor), held_out)
        row |= {f"{k}_fakequant": v for k, v in fidelity.as_dict().items()}
        row["export_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "dir"}), flush=True)
        rows.append(row)
        gc.collect()
    return rows


def time_variants(rows: list[dict], args, image: torch.Tensor) -> None:
    """Interleaved rounds over every variant; fills the timing fields of each row."""
    predictors = {row["variant"]: OnnxImagePredictor(row["dir"], threads=args.threads) for row in rows}
    size = rows[0]["image_size"]
    box = np.array([0.2, 0.2, 0.7, 0.7], np.float32) * size
    encoder, decoder = {name: [] for name in predictors}, {name: [] for name in predictors}
    for predictor in predictors.values():  # warm-up
        predictor.set_image(image)
        predictor.predict_box(box)
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.set_image(image)
            encoder[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            predictor.predict_box(box)
            decoder[name].append(time.perf_counter() - start)
        load.append(os.getloadavg()[0])
    for row in rows:
        name = row["variant"]
        row["encoder_s_median"] = statistics.median(encoder[name])
        row["encoder_s_min"] = min(encoder[name])
        row["decoder_ms_median"] = 1e3 * statistics.median(decoder[name])
        row["load_avg"] = [round(min(load), 2), round(max(load), 2)]
    predictors.clear()
    gc.collect()
    for row in rows:
        row["peak_memory_mib"] = peak_memory_mib(row["dir"], args.threads)
        if args.profile:
            row["profile_ms"] = profile_encoder(
                Path(row["dir"]) / "encoder.onnx", image.numpy(), args.threads
            )


def ratio(value: float, reference: float, inverse: bool = False) -> str:
    if not reference or math.isnan(value) or math.isnan(reference):
        return "-"
    return f"{(reference / value if inverse else value / reference):.2f}x"


def table(rows: list[dict]) -> str:
    head = [
        "px", "variant", "layers (ONNX kernel)", "encoder s (median)", "speed vs fp32", "encoder s (min)",
        "speed vs fp32 (min)", "decoder ms", "peak memory MiB", "file MB", "size vs fp32", "mask IoU vs fake-quant (mean / min)",
        "emb err vs fake-quant",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        fp32 = next(r for r in rows if r["variant"] == "fp32" and r["image_size"] == row["image_size"])
        kernels = ", ".join(f"{k} {n}" for k, n in sorted(row["kernels"].items())) or "fp32"
        cells = [
            str(row["image_size"]),
            row["variant"],
            kernels,
            f"{row['encoder_s_median']:.3f}",
            ratio(row["encoder_s_median"], fp32["encoder_s_median"], inverse=True),
            f"{row['encoder_s_min']:.3f}",
            ratio(row["encoder_s_min"], fp32["encoder_s_min"], inverse=True),
            f"{row['decoder_ms_median']:.1f}",
            f"{row['peak_memory_mib']:.0f}",
            f"{row['file_bytes'] / 1e6:.1f}",
            ratio(row["file_bytes"], fp32["file_bytes"]),
            f"{row['iou_mean_fakequant']:.4f} / {row['iou_min_fakequant']:.4f}",
            f"{row['emb_err_fakequant']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """Milliseconds per encoder call by op group (and the largest op types), one column per variant."""
    keys = list(dict.fromkeys(k for r in rows for k in r["profile_ms"] if k.startswith("group: ")))
    ops = {k for r in rows for k in r["profile_ms"] if not k.startswith("group: ")}
    keys += sorted(ops, key=lambda k: -max(r["profile_ms"].get(k, 0.0) for r in rows))[:10]
    head = ["op (ms per encoder call)", *(f"{r['image_size']} px {r['variant']}" for r in rows)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = [f"{r['profile_ms'].get(key, 0.0):.0f}" for r in rows]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="t", help="SAM2.1 size: t, s, b+, l")
    parser.add_argument("--checkpoint", help="a Meta-format checkpoint (default: seeded random init)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants")
    parser.add_argument("--calib-images", type=int, default=8, help="synthetic calibration images")
    parser.add_argument("--eval-images", type=int, default=4, help="held-out images for mask fidelity")
    parser.add_argument("--data-root", default="data/bench")
    parser.add_argument("--keep", type=Path, help="keep the exports here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--profile", action="store_true", help="add each row's ONNX Runtime profile (ms per op type)"
    )
    args = parser.parse_args()
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")
    torch.set_num_threads(args.threads)
    print(
        f"SAM2.1-{args.size} {'from ' + args.checkpoint if args.checkpoint else 'random init'}, "
        f"{describe_device()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{args.threads} ORT thread(s), load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    images = args.calib_images + args.eval_images
    shards = ensure_synth(args.data_root, videos=1, frames=2, size=256, seed=0, images=images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for image_size in args.image_sizes:
            data = calibration_set(None, shards.images, 0, 0, images, image_size)
            workload = Workload([], data.images[: args.calib_images], max_objects=1)
            held_out = prompt_sets(data.images[args.calib_images :], image_size)
            size_rows = build_variants(args, image_size, root / str(image_size), workload, held_out)
            time_variants(size_rows, args, held_out[0].image)
            rows += size_rows
            print(table(size_rows), flush=True)
            if args.profile:
                print(profile_table(size_rows), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
