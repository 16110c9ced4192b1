"""Memory-bank benchmark: stock FIFO vs SIS vs SIS with freeing vs Mutual-KV on one long synthetic stream.

Per policy: per-frame latency, tensor memory the predictor's state holds (inputs excluded), memory attention's
cost per frame (memory maps fed, FLOPs and the bytes of the cross-attention keys and values, from the module
shapes and the token counts each call sees), and J&F of its masks against FIFO's (fidelity: random-init weights
make labels meaningless, agreement with stock SAM2 is not). The predictors run in lockstep on the same frames,
so machine noise hits them alike. Frames are generated on demand, so 10,000 frames at 1024 px never sit in
memory at once.

    python benchmarks/memory.py --frames 1000 --image-size 128                  # CPU, reduced resolution
    python benchmarks/memory.py --frames 10000 --image-size 1024                # GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from common import describe_device
from torch import nn

from mqsam2.data.stream import SyntheticStream
from mqsam2.memory import Prompt
from mqsam2.memory.predictor import state_nbytes
from mqsam2.metrics import boundary_f_measure, region_similarity
from mqsam2.models import build_sam2

POLICIES = {
    "fifo": ("fifo", {}),
    "sis": ("sis", {}),
    "sis+free": ("sis", {"free_evicted": True}),
    "mutual-kv": ("mutual-kv", {}),
}


def memory_attention_cost(
    attention: nn.Module, queries: int, keys: int, element_size: int
) -> tuple[int, int]:
    """(FLOPs, cross-attention K/V bytes) of one memory-attention call on `queries` current-frame tokens and
    `keys` memory tokens: every layer's projections, self- and cross-attention matmuls and MLP, 2 FLOPs per
    multiply-add (norms, softmax and RoPE left out)."""

    def linear(layer: nn.Linear, tokens: int) -> int:
        return 2 * tokens * layer.in_features * layer.out_features

    flops = kv_bytes = 0
    for layer in attention.layers:
        self_attn, cross = layer.self_attn, layer.cross_attn_image
        flops += sum(linear(p, queries) for p in (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj))
        flops += linear(self_attn.out_proj, queries) + 4 * queries * queries * self_attn.internal_dim
        flops += linear(cross.q_proj, queries) + linear(cross.out_proj, queries)
        flops += (
            linear(cross.k_proj, keys) + linear(cross.v_proj, keys) + 4 * queries * keys * cross.internal_dim
        )
        flops += linear(layer.linear1, queries) + linear(layer.linear2, queries)
        kv_bytes += 2 * keys * cross.internal_dim * element_size
    return flops, kv_bytes


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    video_size = tuple(args.video_size or (args.image_size * 3 // 4, args.image_size))
    stream = SyntheticStream(args.frames, args.image_size, video_size, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    element_size = 2 if device.type == "cuda" else 4
    runs = {}
    with autocast:
        for name in args.policies:
            policy, options = POLICIES[name]
            if policy == "mutual-kv" and args.threshold is not None:
                options = {**options, "threshold": args.threshold}
            model = build_sam2(
                args.size,
                checkpoint=args.checkpoint,
                image_size=args.image_size,
                seed=args.seed,
                device=device,
                memory_policy=policy,
                memory_overrides=options,
            )
            state = model.init_state_from_frames(stream[0][None], video_size)
            state["images"], state["num_frames"] = (
                stream,
                len(stream),
            )  # sam2 reads frames by index, on demand
            model.add_prompt(state, 1, Prompt.from_mask(0, stream.mask(0).cpu()))
            runs[name] = {
                "state": state,
                "frames": model.propagate_in_video(state),
                "latency": [],
                "held": [],
                "gpu": [],
                "j": [],
                "f": [],
                "maps": [],
                "flops": [],
                "kv": [],
            }

            def cost(attention, _args, kwargs, _output, r=runs[name]):
                curr = kwargs["curr"][0] if isinstance(kwargs["curr"], list) else kwargs["curr"]
                keys = kwargs["memory"].shape[0]
                flops, kv_bytes = memory_attention_cost(attention, curr.shape[0], keys, element_size)
                r["maps"].append((keys - kwargs["num_obj_ptr_tokens"]) / curr.shape[0])
                r["flops"].append(flops)
                r["kv"].append(kv_bytes)

            model.memory_attention.register_forward_hook(cost, with_kwargs=True)
        for t in range(args.frames):
            masks = {}
            for name, r in runs.items():
                start = time.perf_counter()
                _, _, logits = next(r["frames"])
                masks[name] = (logits[0] > 0).cpu()  # the copy synchronises the device
                r["latency"].append(time.perf_counter() - start)
                if t % args.memory_every == 0 or t == args.frames - 1:
                    r["held"].append(state_nbytes(r["state"]))
                    if device.type == "cuda":
                        r["gpu"].append(torch.cuda.memory_allocated(device))
            for name, r in runs.items():
                if "fifo" in masks and name != "fifo":
                    r["j"].append(float(region_similarity(masks[name], masks["fifo"])))
                    r["f"].append(float(boundary_f_measure(masks[name], masks["fifo"])))
            if args.progress_every and t % args.progress_every == 0:
                print(
                    f"frame {t}: "
                    + ", ".join(
                        f"{name} {1e3 * statistics.fmean(r['latency'][-args.progress_every :]):.1f} ms/frame "
                        f"(mean of the last {min(t + 1, args.progress_every)}), state {r['held'][-1] / 2**20:.1f} MiB"
                        + (f", GPU {r['gpu'][-1] / 2**20:.0f} MiB" if r["gpu"] else "")
                        for name, r in runs.items()
                    ),
                    flush=True,
                )
    summary = {}
    for name, r in runs.items():
        lat = [x * 1e3 for x in r["latency"][1:]]  # frame 0 is the prompt frame: no tracking
        j, f = (statistics.fmean(r[k][1:]) if r[k] else float("nan") for k in ("j", "f"))
        summary[name] = {
            "ms_mean": statistics.fmean(lat),
            "ms_p50": statistics.median(lat),
            "ms_p95": statistics.quantiles(lat, n=20)[-1],
            "ms_last100": statistics.fmean(lat[-100:]),
            "held_mb_end": r["held"][-1] / 2**20,
            "held_mb_max": max(r["held"]) / 2**20,
            "gpu_mb_start": r["gpu"][0] / 2**20 if r["gpu"] else float("nan"),
            "gpu_mb_end": r["gpu"][-1] / 2**20 if r["gpu"] else float("nan"),
            "jf_vs_fifo": (j + f) / 2,
            "maps_mean": statistics.fmean(r["maps"]),
            "maps_last100": statistics.fmean(r["maps"][-100:]),
            "gflop_mean": statistics.fmean(r["flops"]) / 1e9,
            "gflop_last100": statistics.fmean(r["flops"][-100:]) / 1e9,
            "kv_mb_last100": statistics.fmean(r["kv"][-100:]) / 2**20,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument(
        "--video-size", type=int, nargs=2, metavar=("H", "W"), help="default: 3/4 x image size by image size"
    )
    parser.add_argument("--size", default="t", help="SAM2 size: t, s, b+, l (random init)")
    parser.add_argument(
        "--checkpoint", help="a checkpoint for --size (e.g. the shared trained tiny at 512 px)"
    )
    parser.add_argument(
        "--threshold", type=float, help="Mutual-KV's cosine threshold (default: the policy's own)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-every", type=int, default=50, help="measure held memory every N frames")
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=list(POLICIES),
        default=list(POLICIES),
        help="J&F is scored against fifo when it runs; GPU memory is per process, so run one policy for it",
    )
    parser.add_argument("--progress-every", type=int, default=0, help="print a progress line every N frames")
    args = parser.parse_args()
    weights = args.checkpoint or "random init"
    print(
        f"SAM2.1-{args.size} {weights}, {args.frames} frames at {args.image_size} px, {describe_device()}, "
        f"torch {torch.__version__}"
    )
    summary = run(args)
    print(
        "| policy | ms/frame mean | p50 | p95 | last 100 | held MB (end) | held MB (max) | GPU MB start | GPU MB end "
        "| J&F vs fifo |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['ms_mean']:.1f} | {s['ms_p50']:.1f} | {s['ms_p95']:.1f} | {s['ms_last100']:.1f} | "
            f"{s['held_mb_end']:.2f} | {s['held_mb_max']:.2f} | {s['gpu_mb_start']:.0f} | {s['gpu_mb_end']:.0f} | "
            + ("reference |" if name == "fifo" else f"{s['jf_vs_fifo']:.4f} |")
        )
    print()
    print("Memory attention per tracked frame (mean over the stream; last 100 frames):")
    print("| policy | maps fed | maps fed (last 100) | GFLOP | GFLOP (last 100) | K/V MB (last 100) |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['maps_mean']:.2f} | {s['maps_last100']:.2f} | {s['gflop_mean']:.3f} | "
            f"{s['gflop_last100']:.3f} | {s['kv_mb_last100']:.2f} |"
        )


if __name__ == "__main__":
    main()
