"""`python -m mqsam2.deploy --run runs/<name> --target {onnx,cuda}`: write a finished run's deployable
artefact and its report (speed, memory, size, fidelity) into runs/<name>/deploy/<target>/ and the model card
(`mqsam2.deploy.run` says what each target measures)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mqsam2.cli import OneLineArgumentParser, count, run_command
from mqsam2.deploy.run import TARGETS, DeployRunConfig, deploy_dir, deploy_run


def parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m mqsam2.deploy", description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="a finished fit run directory (runs/<name>)")
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument(
        "--threads", type=count(), help="onnx: ONNX Runtime intra-op threads (default: its own)"
    )
    parser.add_argument("--repeats", type=count(), default=5, help="timed calls after one warm-up")
    parser.add_argument("--images", type=count(), default=4, help="images whose box prompts measure fidelity")
    parser.add_argument(
        "--low-bit-kernel",
        choices=["int8", "int4"],
        default="int8",
        help="onnx: how 2-4-bit Linear layers run",
    )
    parser.add_argument("--compile-mode", default="max-autotune", help="cuda: torch.compile mode, or none")
    return parser


def _deploy(args) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    config = DeployRunConfig(
        target=args.target,
        threads=args.threads,
        repeats=args.repeats,
        images=args.images,
        low_bit_kernel=args.low_bit_kernel,
        compile_mode=args.compile_mode,
    )
    report = deploy_run(args.run, config)
    out = deploy_dir(args.run, args.target)
    print(f"wrote {out} ({', '.join(report['artefact'])}, report.json, report.md) and the model card")
    print((out / "report.md").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(lambda: _deploy(args), on_stop="the deployment is unfinished; run the command again")


if __name__ == "__main__":
    sys.exit(main())
