"""Does a checkpoint work on the project's synthetic clips? Float J&F against the labels for each object-count
range, so a grid's validation clips can be put in the regime the model was trained on; and the mean IoU with
the label on each object's prompted frame and on the frame after it (J&F skips the prompted frame; a model
that segments only from the next frame on gives nothing to single-image mask mAP).

    PYTHONPATH=src python benchmarks/synth_regime.py --checkpoint ../shared/models/sam21t_512_synth.pt
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import describe_device

from mqsam2.compare import aggregate, score_clips
from mqsam2.data import validation_set
from mqsam2.data.synth import write_synth
from mqsam2.evaluate import clip_prompts, track
from mqsam2.metrics.jandf import JandF
from mqsam2.models import build_sam2


def prompt_frame_ious(masks: list, clips: list, prompts: list) -> tuple[float, float]:
    """Mean IoU with the label over prompted objects: on the prompted frame, and on the frame after it (where
    annotated); an empty prediction of an empty label counts as 1, as in J."""
    prompted, following = JandF(), JandF()
    for pred, clip, clip_prompts_ in zip(masks, clips, prompts, strict=True):
        for obj_id, prompt in clip_prompts_.items():
            row = list(clip.obj_ids).index(obj_id)
            prompted.update(
                pred[row, prompt.frame : prompt.frame + 1], clip.masks[row, prompt.frame : prompt.frame + 1]
            )
            after = prompt.frame + 1
            if after < len(clip.frames) and clip.annotated[after]:
                following.update(pred[row, after : after + 1], clip.masks[row, after : after + 1])
    next_iou = float(following.compute()["J"]) if following.tracks else float("nan")
    return float(prompted.compute()["J"]), next_iou


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="the trained model to check (default: random init, a smoke run)")
    parser.add_argument("--size", default="t")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--objects", nargs="+", default=["1-3", "2-5"], help="ranges fewest-most")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    model = build_sam2(args.size, checkpoint=args.checkpoint, image_size=args.image_size).eval()
    print(f"SAM2.1-{args.size} {args.checkpoint}, {describe_device()}, torch {torch.__version__}")
    print(
        "| objects | clips x frames | tracks | J | F | J&F | IoU prompted frame | IoU next frame | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for objects in args.objects:
        fewest, most = (int(v) for v in objects.split("-"))
        with tempfile.TemporaryDirectory() as root:
            shards = write_synth(
                root,
                args.clips,
                args.frames,
                args.image_size,
                args.seed,
                images=0,
                num_objects=(fewest, most),
            )
            clips = list(
                validation_set(shards.videos, None, args.clips, args.frames, 0, args.image_size).videos
            )
            prompts = [clip_prompts(clip, "box") for clip in clips]
            start = time.perf_counter()
            with torch.inference_mode():
                masks = [track(model, clip, p) for clip, p in zip(clips, prompts, strict=True)]
            s = aggregate(score_clips(masks, None, clips, prompts))
            prompted, following = prompt_frame_ious(masks, clips, prompts)
        print(
            f"| {objects} | {args.clips} x {args.frames} | {s['tracks']} | {s['J']:.3f} | {s['F']:.3f} "
            f"| {s['J&F']:.3f} | {prompted:.3f} | {following:.3f} | {time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
