"""Does an allocation's error model predict what the allocation does to the masks?

An allocation narrows some layers and widens others at an equal budget; it wins only if what it saves where it
widens exceeds what it loses where it narrows, and it judges both from its error model. This script groups the
layers by the width an allocation gave them (inputs and weights separately) and, for each group, sets the sum
of the model's predicted costs beside the measured mask KL (mean per-pixel Bernoulli KL of every mask-logit map,
`mqsam2.kl_importance`) of quantizing the whole group together, at the uniform width and at the allocated one,
every other layer in floating point; the last rows do the same for all layers at once. Quantizers are those
calibration sets (the model's observers over the calibration clips); the KL is measured on one sample.

    # the trained model, an allocation a grid made (its importance.json and a row's plan.json)
    python benchmarks/cost_model.py --checkpoint ../shared/models/sam21t_512_synth.pt --image-size 512 \
        --calib <calibration shards> --calib-videos 2 --calib-frames 8 --sample-frames 8 \
        --importance docs/gpu/sam21t_512_regime/importance.json --plan <row>_plan.json
    # toy size (random init, synthetic clips): importance, gains, mask KL and the allocation made here
    python benchmarks/cost_model.py --image-size 64 --layers trunk.blocks.0.,sam_mask_decoder.transformer.layers.0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch
from common import describe_device, synthetic_workload

from mqsam2 import api
from mqsam2.allocation import allocate, cost_table
from mqsam2.data import calibration_set
from mqsam2.importance import read_importance
from mqsam2.kl_importance import decoder_logits
from mqsam2.models import build_sam2
from mqsam2.propagation import mask_kl_with, quantized_output
from mqsam2.quant.swap import QuantConfig, quantizable_layers
from mqsam2.sensitivity import calibrate_quantizers
from mqsam2.workload import Workload

SIDES = {"a": ("inputs", "act_elements"), "w": ("weights", "num_params")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="t")
    parser.add_argument("--checkpoint", default=None, help="a SAM2 checkpoint (default: random init, toy)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--calib", default=None, help="calibration video shards (default: synthetic)")
    parser.add_argument("--calib-videos", type=int, default=1)
    parser.add_argument("--calib-frames", type=int, default=3)
    parser.add_argument("--sample-frames", type=int, default=3, help="frames of the first clip the KL is on")
    parser.add_argument("--importance", default=None, help="importance.json (default: measured here)")
    parser.add_argument("--plan", default=None, help="plan.json (default: allocated here with --error)")
    parser.add_argument("--error", default="propagated", help="the error model to predict with")
    parser.add_argument("--target", type=int, default=4, help="Avg-b of the allocation and the uniform width")
    parser.add_argument("--sides", default="a,w", help="inputs (a) and/or weights (w)")
    parser.add_argument(
        "--layers",
        default=None,
        help="quantize only layers whose names contain one of these (comma-separated)",
    )
    parser.add_argument("--data-root", default="bench-data")
    parser.add_argument("--json", default=None, help="write the rows here too")
    return parser.parse_args()


def load_workload(args: argparse.Namespace, image_size: int) -> Workload:
    if args.calib is None:
        return synthetic_workload(args.data_root, args.calib_videos, args.calib_frames, 0, image_size, None)
    data = calibration_set(args.calib, None, args.calib_videos, args.calib_frames, 0, image_size, seed=0)
    return Workload(data.videos, [])


def allocation_of(args, importance, candidates) -> tuple[dict[str, int], dict[str, int], str]:
    """(weight widths, input widths, error model) of the plan given, or of one allocated here."""
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
        return plan["bits"], plan["act_bits"], plan.get("error", args.error)
    made = allocate(
        importance, target_avg=args.target, candidates=candidates, error=args.error, activations="separate"
    )
    return made.plan, made.act_plan, args.error


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = build_sam2(args.size, args.checkpoint, args.image_size).eval()
    workload = load_workload(args, model.image_size)
    quant = QuantConfig(bits=args.target, weight_observer="mse", act_observer="mse")
    if args.layers:
        wanted = args.layers.split(",")
        others = tuple(n for n in quantizable_layers(model) if not any(w in n for w in wanted))
        quant = dataclasses.replace(quant, keep_fp=quant.keep_fp + others)
    candidates = [args.target - 1, args.target, args.target + 1]
    sample = workload.samples(1, args.sample_frames, 0)
    if args.importance:
        importance = read_importance(args.importance)
    else:
        shape = [1, args.sample_frames, 0]  # the first clip's first frames, as a grid's gain_samples
        importance = api.measure_importance(
            model,
            workload,
            quant,
            candidates,
            gain_samples=shape if args.error == "propagated" else None,
            mask_samples=shape if args.error == "mask" else None,
        )
    bits, act_bits, error = allocation_of(args, importance, candidates)
    layers = {n: m for n, m in quantizable_layers(model, quant.keep_fp).items() if n in importance}
    start = time.perf_counter()
    quantizers = calibrate_quantizers(layers, lambda: workload.run_full(model), candidates, quant)
    runs = [lambda s=s: s.run_full(model) for s in sample]
    references = [decoder_logits(model, run) for run in runs]
    names = [n for n in importance if n in quantizers]
    rows = []
    for side in args.sides.split(","):
        label, size = SIDES[side]
        allocated = bits if side == "w" else act_bits
        costs = dict(zip(importance, cost_table(importance, candidates, error, side), strict=True))
        widths = {n: int(allocated.get(n, args.target)) for n in names}

        def measure(group, at, side=side):
            forwards = {layers[n]: quantized_output(quantizers[n], at(n), side) for n in group}
            return mask_kl_with(model, runs, references, forwards)

        def predict(group, at, costs=costs):
            return sum(costs[n][candidates.index(at(n))] for n in group)

        total = sum(getattr(importance[n], size) for n in names)
        groups = [(f"{b} bits", [n for n in names if widths[n] == b]) for b in sorted(set(widths.values()))]
        for title, group in [*groups, ("all layers", names)]:
            share = sum(getattr(importance[n], size) for n in group) / total
            rows.append(
                {
                    "side": label,
                    "group": title,
                    "layers": len(group),
                    "share": share,
                    "predicted_uniform": predict(group, lambda _n: args.target),
                    "measured_uniform": measure(group, lambda _n: args.target),
                    "predicted_allocated": predict(group, widths.get),
                    "measured_allocated": measure(group, widths.get),
                }
            )
    seconds = time.perf_counter() - start
    print(
        f"# cost model `{error}` against the measured mask KL: SAM2.1-{args.size} at {model.image_size} px, "
        f"{'checkpoint ' + Path(args.checkpoint).name if args.checkpoint else 'random init'}, "
        f"{describe_device()}, {datetime.date.today()}; {len(names)} layers, Avg-{args.target} allocation vs "
        f"uniform {args.target} bits; KL on 1 clip x {args.sample_frames} frames; {seconds:.0f} s\n"
    )
    print(
        "| side | layers at | layers | share of the budget | predicted KL at uniform | measured | "
        "predicted KL as allocated | measured | measured / predicted (allocated) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (
            r["measured_allocated"] / r["predicted_allocated"] if r["predicted_allocated"] else float("nan")
        )
        print(
            f"| {r['side']} | {r['group']} | {r['layers']} | {r['share']:.2f} | {r['predicted_uniform']:.2e} | "
            f"{r['measured_uniform']:.2e} | {r['predicted_allocated']:.2e} | {r['measured_allocated']:.2e} | "
            f"{ratio:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"error": error, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
