"""What the PTQ4SAM and Mix-QSAM steps cost next to a float pass over the same calibration workload, so a
compare grid can be budgeted: Bimodal Integration, calibration with log2 against uniform softmax quantizers
(MinMax observers, to isolate the (tau, s) search), Mix-QSAM's KL measurement (one pass per layer and sample)
and its IQP solve, with what each decided.

    python benchmarks/methods.py --image-size 64 --clips 1 --images 1          # CPU smoke run
    TQDM_DISABLE=1 python benchmarks/methods.py --checkpoint sam21t_512_synth.pt --image-size 512
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from common import describe_device, synthetic_workload

from mqsam2.api import Recipe
from mqsam2.bimodal import integrate_bimodal
from mqsam2.iqp import solve_iqp
from mqsam2.kl_importance import measure_output_kl
from mqsam2.methods.mixqsam import mixqsam_program
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantizable_layers, quantize


def _timed(step) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="t")
    parser.add_argument("--checkpoint")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--data-root", default="data/bench")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_sam2(args.size, checkpoint=args.checkpoint, image_size=args.image_size).to(device)
    workload = synthetic_workload(args.data_root, args.clips, args.frames, args.images, args.image_size, None)
    rows = [("float pass (clips + images)", *_timed(lambda: workload.run_full(model))[:1], "")]

    flipped_model = copy.deepcopy(model)
    seconds, flipped = _timed(
        lambda: integrate_bimodal(flipped_model, lambda: workload.run_full(flipped_model))
    )
    rows.append(("PTQ4SAM Bimodal Integration", seconds, f"{len(flipped)} modules flipped"))
    for probs in ("uniform", "log2"):
        quantized = quantize(
            copy.deepcopy(model), QuantConfig(bits=args.bits, quantize_attention=True, attention_probs=probs)
        )

        def calibrate(quantized=quantized) -> None:
            with calibration(quantized):
                workload.run_full(quantized)

        rows.append((f"calibration, {probs} softmax quantizer", _timed(calibrate)[0], ""))

    recipe = Recipe(method="mixqsam", bits=args.bits)
    candidates = recipe.candidate_widths()
    config = dataclasses.replace(recipe.quant, weight_observer="mse", act_observer="mse")
    samples = [dataclasses.replace(workload, videos=[c], images=[]) for c in workload.videos] + [
        dataclasses.replace(workload, videos=[], images=[i]) for i in workload.images
    ]
    layers = quantizable_layers(model, config.keep_fp)
    seconds, sensitivity = _timed(
        lambda: measure_output_kl(
            model, [lambda s=s: s.run_full(model) for s in samples], layers, candidates[0], config
        )
    )
    rows.append(
        ("Mix-QSAM KL importance", seconds, f"{len(sensitivity.names)} layers x {len(samples)} samples")
    )
    program = mixqsam_program(sensitivity, candidates, args.bits)
    seconds, choice = _timed(lambda: solve_iqp(*program))
    widths = [candidates[k] for k in choice]
    rows.append(("Mix-QSAM IQP solve", seconds, str({b: widths.count(b) for b in candidates})))

    print(
        f"{describe_device()}; SAM2.1-{args.size} at {args.image_size} px; {args.clips} clips x {args.frames} frames, {args.images} images; {args.bits} bits"
    )
    print("| step | seconds | decided |\n|---|---:|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.1f} | {note} |")


if __name__ == "__main__":
    main()
