"""Exact ILP against the paper's greedy for Eq. 6 on the SAM2.1 t / s / b+ / l layer inventories.

Importance comes from randomly initialised models at image size 256 (the scores only have to be realistic in
spread, not trained): a 4-frame random clip through SAM2VideoPredictor with a box and a refining click on
object 1 and a mask on object 2, so that every nn.Linear and nn.Conv2d, mask-input convs included, sees input.
For each model, target in {4, 6} and candidate set, it prints the objective of both solvers, the greedy's
gap and the solve times as a Markdown table; --plot-dir also writes the Figure-3-style chart, plan.json and
importance.json of the ILP at target 4 with candidates {3, 4, 5} (the paper's Figure 3 setting).

    PYTHONPATH=src python benchmarks/allocation.py [--sizes t s b+ l] [--repeats 3] [--plot-dir DIR]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor

from mqsam2.allocation import (
    AllocationError,
    allocate,
    objective,
    solve_greedy,
    solve_ilp,
    write_plan,
)
from mqsam2.allocation_figures import plot_allocation
from mqsam2.importance import ImportanceCollector, LayerImportance, write_importance

CONFIGS = {
    "t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
TARGETS = (4, 6)
CANDIDATE_SETS = ((3, 4, 5), (4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 7, 8))
IMAGE_SIZE = 256


def inventory_importance(config: str, frames_dir: Path) -> dict[str, LayerImportance]:
    """Importance of every Linear / Conv2d of a random-init SAM2.1 video predictor on a short random clip."""
    torch.manual_seed(0)
    predictor = build_sam2_video_predictor(
        config,
        device="cpu",
        apply_postprocessing=False,
        hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"],
    )
    with torch.inference_mode(), ImportanceCollector(predictor) as collector:
        state = predictor.init_state(str(frames_dir))
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=np.array([40, 40, 200, 180]))
        predictor.add_new_points_or_box(
            state,
            frame_idx=0,
            obj_id=1,
            points=np.array([[120, 110]]),
            labels=np.array([1]),
            clear_old_points=False,
        )
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        mask[150:230, 20:100] = True
        predictor.add_new_mask(state, frame_idx=0, obj_id=2, mask=mask)
        for _ in predictor.propagate_in_video(state):
            pass
    return collector.compute()


def timed(solve, *args) -> tuple[list[int], float]:
    start = time.perf_counter()
    bits = solve(*args)
    return bits, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="ILP solves per row; median and max are shown")
    parser.add_argument(
        "--plot-dir", type=Path, help="write chart, plan and importance of the Figure 3 setting"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as frames_dir:
        for index in range(4):
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(frames_dir) / f"{index:05d}.jpg")
        inventories = {}
        for size in args.sizes:
            start = time.perf_counter()
            inventories[size] = inventory_importance(CONFIGS[size], Path(frames_dir))
            seconds = time.perf_counter() - start
            print(f"SAM2.1-{size}: {len(inventories[size])} layers, importance in {seconds:.1f} s")

    print()
    columns = ["model", "layers", "target", "candidates", "ILP objective", "greedy objective", "greedy gap"]
    columns += ["ILP s (median / max)", "greedy s"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for size, importance in inventories.items():
        scores = [layer.score for layer in importance.values()]
        params = [layer.num_params for layer in importance.values()]
        for target in TARGETS:
            for candidates in CANDIDATE_SETS:
                row = f"| SAM2.1-{size} | {len(scores)} | {target} | {{{','.join(map(str, candidates))}}} |"
                try:
                    runs = [timed(solve_ilp, scores, params, candidates, target) for _ in range(args.repeats)]
                except AllocationError as rejected:
                    print(f"{row} rejected: {rejected} | | | | |")
                    continue
                greedy, greedy_seconds = timed(solve_greedy, scores, params, candidates, target)
                exact = objective(scores, runs[0][0])
                approx = objective(scores, greedy)
                seconds = [run[1] for run in runs]
                print(
                    f"{row} {exact:.4e} | {approx:.4e} | {100 * (approx - exact) / exact:.1f} % "
                    f"| {statistics.median(seconds):.2f} / {max(seconds):.2f} | {greedy_seconds:.2f} |"
                )

    if args.plot_dir:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        for size, importance in inventories.items():
            result = allocate(importance, method="ilp", target_avg=4, candidates=(3, 4, 5))
            plot_allocation(
                result.names,
                result.bits,
                [layer.score for layer in importance.values()],
                args.plot_dir / f"allocation_sam2.1-{size}.png",
                title=f"SAM2.1-{size} (random init), ILP, candidates {{3,4,5}}, "
                f"average {result.average_bits:.3f} bits",
            )
            write_plan(result, args.plot_dir / f"plan_sam2.1-{size}.json")
            write_importance(importance, args.plot_dir / f"importance_sam2.1-{size}.json")


if __name__ == "__main__":
    main()
