"""The ONNX video tracker on the CPU: does it track what the PyTorch fake-quant tracker tracks, and how fast is
it against the fp32 ONNX tracker of the same model, in one run.

Clips: the trained model's regime (`../shared/data/regime_clips.py`, DAVIS layout), every object prompted with
its box on frame 0; frames prepared by `mqsam2.deploy.onnx.track.prepare_frame` (the data layer's arithmetic)
for both trackers. Models: the checkpoint in float (exported as the fp32 ONNX tracker) and quantized W8A8,
calibrated (MinMax) by tracking the calibration clips. Per clip, the PyTorch fake-quant tracker
(`VideoPredictor.track_clip`, CPU) gives the reference masks; the quantized ONNX tracker's masks are scored
against them (DAVIS J&F over the tracks, all frames), and so are the fp32 ONNX tracker's against the PyTorch
float tracker's. Speed: frames per second of each ONNX tracker over the same clips (the two run one after the
other on each clip, so load from other processes spreads over both).

    python ../shared/data/regime_clips.py --out data/regime/val8 --first 100000 --count 8 --frames 16
    python ../shared/data/regime_clips.py --out data/regime/calib2 --first 0 --count 2 --frames 8
    PYTHONPATH=src python benchmarks/onnx_tracker.py --clips data/regime/val8 --calib data/regime/calib2 \\
        --checkpoint ../shared/models/sam21t_512_synth.pt --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import describe_device

from mqsam2.data.files import numbered_files, read_mask_png
from mqsam2.deploy.onnx import OnnxVideoTracker, export_video_tracker
from mqsam2.deploy.onnx.track import box_prompts, prepare_frame
from mqsam2.memory import Prompt
from mqsam2.metrics.jandf import JandF
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantize


def read_clip(folder: Path, image_size: int) -> dict:
    """Prepared frames [T, 3, S, S], the video size and the frame-0 box prompts of one DAVIS clip."""
    jpegs = numbered_files(folder, ".jpg")
    first = read_mask_png(
        folder.parent.parent.parent / "Annotations" / folder.parent.name / folder.name / "00000.png"
    )
    frames = np.stack([prepare_frame(path, image_size) for path in jpegs.values()])
    return {
        "name": folder.name,
        "frames": frames,
        "video_size": first.shape,
        "prompts": box_prompts(first, 0),
    }


def clips_in(root: Path, image_size: int, limit: int | None) -> list[dict]:
    folders = sorted((root / "JPEGImages" / "480p").iterdir())[:limit]
    return [read_clip(folder, image_size) for folder in folders]


def torch_prompts(clip: dict) -> dict[int, Prompt]:
    return {
        obj_id: Prompt(p.frame, box=tuple(float(v) for v in p.box)) for obj_id, p in clip["prompts"].items()
    }


def torch_masks(model, clip: dict) -> dict[int, np.ndarray]:
    masks = model.track_clip(torch.from_numpy(clip["frames"]), clip["video_size"], torch_prompts(clip))
    return {obj_id: masks[row].numpy() for row, obj_id in enumerate(clip["prompts"])}


def jandf(pred: dict[int, np.ndarray], reference: dict[int, np.ndarray], metric: JandF) -> None:
    for obj_id, masks in reference.items():
        metric.update(torch.from_numpy(pred[obj_id]), torch.from_numpy(masks))


def timed_track(tracker: OnnxVideoTracker, clip: dict) -> tuple[dict[int, np.ndarray], float]:
    start = time.perf_counter()
    masks = tracker.track(clip["frames"], clip["video_size"], clip["prompts"])
    return masks, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=Path, required=True, help="DAVIS-layout folder of validation clips")
    parser.add_argument("--calib", type=Path, required=True, help="DAVIS-layout folder of calibration clips")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--count", type=int, default=8, help="validation clips")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policy", choices=["fifo", "sis"], default="fifo")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    float_model = build_sam2(
        "t", checkpoint=args.checkpoint, image_size=args.image_size, memory_policy=args.policy
    )
    quantized = quantize(
        build_sam2("t", checkpoint=args.checkpoint, image_size=args.image_size, memory_policy=args.policy),
        QuantConfig(bits=8),
    )
    with calibration(quantized):
        for clip in clips_in(args.calib, args.image_size, None):
            quantized.track_clip(torch.from_numpy(clip["frames"]), clip["video_size"], torch_prompts(clip))
    clips = clips_in(args.clips, args.image_size, args.count)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_video_tracker(float_model, Path(tmp) / "fp32")
        export_video_tracker(quantized, Path(tmp) / "w8a8")
        export_s = time.perf_counter() - start
        trackers = {
            name: OnnxVideoTracker(Path(tmp) / name, threads=args.threads) for name in ("fp32", "w8a8")
        }
        sources = {"fp32": float_model, "w8a8": quantized}
        metrics = {name: JandF() for name in trackers}
        seconds = dict.fromkeys(trackers, 0.0)
        frames = 0
        for clip in clips:
            frames += len(clip["frames"])
            for name, tracker in trackers.items():
                masks, elapsed = timed_track(tracker, clip)
                seconds[name] += elapsed
                jandf(masks, torch_masks(sources[name], clip), metrics[name])
            print(f"{clip['name']}: {len(clip['prompts'])} objects, {len(clip['frames'])} frames", flush=True)
    rows = [
        {
            "variant": name,
            "tracks": int(metrics[name].tracks),
            **{k: float(v) for k, v in metrics[name].compute().items()},
            "fps": frames / seconds[name],
        }
        for name in trackers
    ]
    print(
        f"\n{describe_device()}; onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads; "
        f"{len(clips)} clips, {frames} frames, {args.policy}; export {export_s:.0f} s\n"
    )
    print("| ONNX tracker | against | tracks | J | F | J&F | frames/s | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        against = "PyTorch float tracker" if row["variant"] == "fp32" else "PyTorch fake-quant tracker"
        print(
            f"| {row['variant']} | {against} | {row['tracks']} | {row['J']:.4f} | {row['F']:.4f} | "
            f"{row['J&F']:.4f} | {row['fps']:.2f} | {row['fps'] / rows[0]['fps']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
