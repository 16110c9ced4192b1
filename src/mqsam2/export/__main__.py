"""`python -m mqsam2.export --run runs/<name>` or `--model quantized.pt`: write the packed export and its
model card, then print where the bytes went.

--run exports a finished fit run directory into runs/<name>/export/model.mq (fit does this itself at the end
when `export: true`); --model exports a file written by `mqsam2.quant.checkpoint.save_quantized`, next to it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from mqsam2.cli import OneLineArgumentParser, run_command
from mqsam2.export.card import bytes_table, card_paths, run_details, run_fp_bytes
from mqsam2.export.format import export_model
from mqsam2.quant.checkpoint import load_quantized
from mqsam2.rundir import RunDir


def parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m mqsam2.export", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a fit run directory (runs/<name>)")
    source.add_argument("--model", type=Path, help="a save_quantized .pt file")
    parser.add_argument("--out", type=Path, help="the export file (default: see above)")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="store float tensors as float16 (smaller; outputs no longer identical)",
    )
    return parser


def _export(args) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    float_dtype = torch.float16 if args.fp16 else torch.float32
    if args.run is not None:
        run = RunDir(args.run)
        model, config = run.load_model()
        out = args.out or run.export
        card = export_model(model, out, run_details(config, run), float_dtype, run_fp_bytes(config))
    else:
        model = load_quantized(args.model)
        out = args.out or args.model.with_suffix(".mq")
        card = export_model(model, out, float_dtype=float_dtype)
    print(f"wrote {out} and its model card {', '.join(str(p) for p in card_paths(out))}")
    print(bytes_table(card))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(lambda: _export(args), on_stop="the export is unfinished; run the command again")


if __name__ == "__main__":
    sys.exit(main())
