"""python -m mqsam2.data {synth, convert-sav, convert-davis, convert-coco}: build WebDataset shards.

Every command runs shards in parallel processes (--workers), skips shards that are already complete (so an
interrupted run resumes), shows a progress bar and ends with a summary. Bad input stops the run with one
line naming the file (exit status 2) unless --skip-bad, which logs and counts the bad items instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mqsam2.cli import OneLineArgumentParser, count, run_command
from mqsam2.data.build import BuildReport
from mqsam2.data.coco import convert_coco
from mqsam2.data.davis import convert_davis
from mqsam2.data.sav import convert_sav
from mqsam2.data.synth import write_synth
from mqsam2.errors import MQSAM2Error


def _size(text: str) -> int | tuple[int, int]:
    """256 (square) or 480x640 (height x width)."""
    try:
        if "x" in text:
            height, width = text.split("x")
            return int(height), int(width)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected S or HxW, like 256 or 480x640") from None


def _objects(text: str) -> int | tuple[int, int]:
    """3 or 2-5 (a range, inclusive)."""
    try:
        if "-" in text:
            low, high = text.split("-")
            return int(low), int(high)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or LOW-HIGH, like 3 or 2-5") from None


def _common(parser: argparse.ArgumentParser, shard_size: int, what: str) -> None:
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument(
        "--shard-size",
        "--maxcount",
        dest="shard_size",
        type=count(),
        default=shard_size,
        help=f"{what} per shard",
    )
    parser.add_argument(
        "--workers", type=count(), default=min(4, os.cpu_count() or 1), help="parallel processes"
    )
    parser.add_argument("--skip-bad", action="store_true", help="log and count bad items instead of stopping")


def _synth(args: argparse.Namespace) -> list[BuildReport]:
    if args.videos == 0 and args.images == 0:
        raise MQSAM2Error("nothing to write: --videos and --images are both 0; give either a positive count")
    return write_synth(
        args.out,
        args.videos,
        args.frames,
        args.size,
        args.seed,
        images=args.images,
        image_size=args.image_size,
        num_objects=args.objects,
        annotate_every=args.annotate_every,
        shard_size=args.shard_size,
        image_shard_size=args.image_shard_size,
        workers=args.workers,
        progress=True,
    ).reports


def _sav(args: argparse.Namespace) -> list[BuildReport]:
    return [
        convert_sav(
            args.root,
            args.out,
            args.split,
            args.clip_len,
            args.manifests,
            args.shard_size,
            args.workers,
            args.skip_bad,
            progress=True,
        )
    ]


def _davis(args: argparse.Namespace) -> list[BuildReport]:
    return [
        convert_davis(
            args.root,
            args.out,
            args.split,
            args.resolution,
            args.fps,
            args.clip_len,
            args.shard_size,
            args.workers,
            args.skip_bad,
            progress=True,
        )
    ]


def _coco(args: argparse.Namespace) -> list[BuildReport]:
    return [
        convert_coco(
            args.images,
            args.annotations,
            args.out,
            args.split,
            args.shard_size,
            args.workers,
            args.skip_bad,
            progress=True,
        )
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m mqsam2.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="synthetic SA-V-like clips and COCO-like images")
    _common(synth, 2, "videos")
    synth.add_argument("--videos", type=count(0), default=8)
    synth.add_argument("--frames", type=count(), default=24)
    synth.add_argument("--size", type=_size, default=256, help="S or HxW")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--images", type=count(0), default=32)
    synth.add_argument("--image-size", type=_size, default=None, help="default: --size")
    synth.add_argument("--objects", type=_objects, default=(2, 5), help="objects per clip: N or LOW-HIGH")
    synth.add_argument(
        "--annotate-every", type=count(), default=1, help="masks on every k-th frame (SA-V: 4)"
    )
    synth.add_argument("--image-shard-size", type=count(), default=8, help="images per shard")
    synth.set_defaults(run=_synth)

    sav = commands.add_parser("convert-sav", help="SA-V: JPEGImages_24fps + Annotations_6fps or sav_*.json")
    _common(sav, 4, "videos")
    sav.add_argument("--root", required=True, help="folder holding JPEGImages_24fps/")
    sav.add_argument("--manifests", default=None, help="folder of sav_*.json manifests (default: --root)")
    sav.add_argument("--split", default="val")
    sav.add_argument("--clip-len", type=count(0), default=0, help="frames per sample (0: whole videos)")
    sav.set_defaults(run=_sav)

    davis = commands.add_parser(
        "convert-davis", help="DAVIS: JPEGImages/480p + Annotations/480p palette PNGs"
    )
    _common(davis, 8, "videos")
    davis.add_argument("--root", required=True, help="folder holding JPEGImages/ and Annotations/")
    davis.add_argument("--split", default="val", help="reads ImageSets/2017/<split>.txt when present")
    davis.add_argument("--resolution", default="480p")
    davis.add_argument("--fps", type=float, default=24.0)
    davis.add_argument("--clip-len", type=count(0), default=0, help="frames per sample (0: whole videos)")
    davis.set_defaults(run=_davis)

    coco = commands.add_parser("convert-coco", help="COCO: images folder + instances json")
    _common(coco, 1000, "images")
    coco.add_argument("--images", required=True, help="folder of the JPEG images")
    coco.add_argument("--annotations", required=True, help="instances_*.json")
    coco.add_argument(
        "--split", default=None, help="default: from the file name (instances_val2017 -> val2017)"
    )
    coco.set_defaults(run=_coco)
    return parser


def _build(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for report in args.run(args):
        print(report.summary())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: _build(args), on_stop="finished shards are kept; run the same command again to finish"
    )


if __name__ == "__main__":
    sys.exit(main())
