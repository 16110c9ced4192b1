"""The model card written next to an export: what was quantized how, on which data, how well, and how small.

Two files with the same content: `<stem>_card.json` for tools and `<stem>_card.md` for people.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mqsam2.files import write_text
from mqsam2.quant.checkpoint import model_spec
from mqsam2.quant.quantizer import ActQuantizer, FakeQuantizer
from mqsam2.quant.swap import quantized_layers

if TYPE_CHECKING:
    from mqsam2.config import FitConfig
    from mqsam2.rundir import RunDir


@dataclass(frozen=True)
class ExportBytes:
    """Where the bytes of an export go; `total` is the file size (`framing`: magic, lengths and checksum)."""

    framing: int
    header: int
    codes: int
    weight_params: int
    float_tensors: int

    @property
    def total(self) -> int:
        return self.framing + self.header + self.codes + self.weight_params + self.float_tensors


class _ByteCounter:
    """A write-only sink: torch.save into it measures a checkpoint's size without writing it."""

    def __init__(self) -> None:
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self.nbytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the float SAM2 underneath a quantized one (quantizer state removed)."""
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, FakeQuantizer))
    return {key: value for key, value in model.state_dict().items() if not key.startswith(prefixes)}


def float_checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of Meta's checkpoint format `torch.save({"model": state_dict})` for the float model, in fp32."""
    sink = _ByteCounter()
    torch.save({"model": {k: v.float() for k, v in float_state_dict(model).items()}}, sink)
    return sink.nbytes


def plan_summary(model: nn.Module) -> dict:
    """Layers and parameters per weight bit-width, the parameter-weighted average, activation widths."""
    layers = quantized_layers(model)
    params = Counter()
    for layer in layers.values():
        params[layer.bits] += layer.weight.numel()
    quantized_params = sum(params.values())
    total_params = sum(p.numel() for p in float_state_dict(model).values())
    act_bits = Counter(m.bits for m in model.modules() if isinstance(m, ActQuantizer))
    return {
        "quantized_layers": len(layers),
        "layers_per_bits": {str(b): n for b, n in sorted(Counter(la.bits for la in layers.values()).items())},
        "params_per_bits": {str(b): n for b, n in sorted(params.items())},
        "average_bits": sum(b * n for b, n in params.items()) / max(quantized_params, 1),
        "quantized_params": quantized_params,
        "float_params": total_params - quantized_params,
        "activation_quantizers_per_bits": {str(b): n for b, n in sorted(act_bits.items())},
    }


def run_details(config: FitConfig, run: RunDir) -> dict:
    """What a fit run contributes to the card: its name, calibration data, method settings (with the units
    reconstructed, and those that kept round-to-nearest weights because reconstruction made them worse) and
    metrics."""
    data = config.data
    shards = data.video_shards or data.image_shards
    kept = [r["unit"] for r in run.unit_records() if r.get("kept_rtn")]
    weights, acts = run.bit_averages()
    card = {
        "name": config.name,
        "run_dir": str(run.path),
        "calibration": {
            "source": "shards" if shards else f"synthetic ({data.root})",
            "video_shards": data.video_shards,
            "image_shards": data.image_shards,
            "videos": data.calib_videos,
            "frames_per_video": data.calib_frames,
            "images": data.calib_images,
            "prompt": data.prompt,
            "weight_observer": config.quant.weight_observer,
            "act_observer": config.quant.act_observer,
        },
        "method": {
            "allocation": config.allocation.method,
            "target_avg_bits": config.allocation.target_avg,
            "weight_avg_bits": weights,
            "act_avg_bits": acts,
            "candidates": list(config.allocation.candidates),
            "reconstruction": config.reconstruction.mode,
            "iters_per_unit": config.reconstruction.iters,
            "reconstructed_units": config.reconstruction.units or "all",
            "units_kept_round_to_nearest": kept,
        },
        "fp_checkpoint": config.model.checkpoint or "none (seeded random init)",
    }
    if config.recipe.method is not None:
        card |= _recipe_details(config, card)
    if run.metrics.exists():
        card["metrics"] = json.loads(run.metrics.read_text())
    return card


def _recipe_details(config: FitConfig, card: dict) -> dict:
    """A recipe run's calibration and method entries: what its registered method decides (observers,
    allocation, reconstruction) in place of the config's own sections, which it does not read."""
    from mqsam2.api import recipe_of  # the api imports this module (through RunDir)

    recipe = recipe_of(config.recipe, config.quant, config.reconstruction, config.seed)
    method = recipe.resolved
    observers = {"weight_observer": method.weight_observer, "act_observer": method.act_observer}
    learns = recipe.learn and method.reconstruction != "none"
    return {
        "calibration": card["calibration"] | observers,
        "method": card["method"]
        | {
            "recipe": method.name,
            "allocation": "mixed" if method.mixed else "uniform",
            "target_avg_bits": recipe.bits,
            "candidates": recipe.candidate_widths(),
            "reconstruction": method.reconstruction if learns else "none",
            "iters_per_unit": recipe.reconstruction.iters if learns else 0,
        },
    }


def run_fp_bytes(config: FitConfig) -> int | None:
    """The size of the run's Meta checkpoint file, the natural FP reference (None for random-init runs)."""
    checkpoint = config.model.checkpoint
    return Path(checkpoint).stat().st_size if checkpoint and Path(checkpoint).is_file() else None


def build_card(
    model: nn.Module,
    path: Path,
    file_format: str,
    sizes: ExportBytes,
    fp_bytes: int | None,
    extra: dict | None,
) -> dict:
    """The card of the export at `path` (already written: its size on disk is measured, not predicted)."""
    on_disk = path.stat().st_size
    fp_source = "given checkpoint" if fp_bytes is not None else "torch.save({'model': fp32 state dict})"
    fp_bytes = fp_bytes if fp_bytes is not None else float_checkpoint_bytes(model)
    config = model.mqsam2_quant_config
    card = {
        "name": path.stem,
        "file": path.name,
        "format": file_format,
        "model": model_spec(model),
        "quantization": {
            "weights": "per-output-channel asymmetric, bit-packed codes",
            "activations": "per-tensor asymmetric" if not config.weight_only else "float",
            "attention_matmuls_quantized": config.quantize_attention,
            "kept_float": list(config.keep_fp),
        },
        "plan": plan_summary(model),
        "bytes": {
            "file_on_disk": on_disk,
            "packed_codes": sizes.codes,
            "scales_and_zero_points": sizes.weight_params,
            "float_tensors": sizes.float_tensors,
            "header": sizes.header,
            "expected_total": sizes.total,
            "fp_checkpoint": fp_bytes,
            "fp_checkpoint_source": fp_source,
            "compression_ratio": fp_bytes / on_disk,
            "savings_percent": 100 * (1 - on_disk / fp_bytes),
        },
    }
    return card | (extra or {})


def bytes_table(card: dict) -> str:
    """The size breakdown as aligned text (also the CLI's output)."""
    sizes = card["bytes"]
    rows = [
        ("packed integer codes", sizes["packed_codes"]),
        ("per-channel scales + zero-points", sizes["scales_and_zero_points"]),
        ("float tensors (float layers, norms, biases)", sizes["float_tensors"]),
        ("header (JSON)", sizes["header"]),
        ("expected total", sizes["expected_total"]),
        (f"{card['file']} on disk", sizes["file_on_disk"]),
        (f"FP checkpoint ({sizes['fp_checkpoint_source']})", sizes["fp_checkpoint"]),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(width)}  {value:>13,d} B  {value / 1e6:9.2f} MB" for label, value in rows]
    lines.append(
        f"{'compression'.ljust(width)}  {sizes['compression_ratio']:>12.2f}x  "
        f"{sizes['savings_percent']:8.1f} % smaller"
    )
    return "\n".join(lines)


def _markdown(card: dict) -> str:
    plan = card["plan"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"Quantized SAM2 (`{card['model']['sam2_config']}`, {card['model']['image_size']} px input) in the "
        f"mqsam2 packed format, file `{card['file']}`.",
        "",
        *_origin(card),
        "```python",
        "from mqsam2.export import load_export",
        f'model = load_export("{card["file"]}")  # video predictor; TensorImagePredictor(model) for images',
        "```",
        "",
        "## Quantization",
        "",
        f"- Weights: {card['quantization']['weights']}; activations: {card['quantization']['activations']}",
        f"- Attention matmuls quantized: {card['quantization']['attention_matmuls_quantized']}",
        f"- Kept in float: {', '.join(f'`{p}`' for p in card['quantization']['kept_float']) or 'none'}",
        f"- {plan['quantized_layers']} quantized layers, average weight bit-width {plan['average_bits']:.3f} "
        f"over {plan['quantized_params']:,} parameters ({plan['float_params']:,} stay float)",
        "",
        "| bits | layers | parameters |",
        "|---|---|---|",
        *(
            f"| {bits} | {plan['layers_per_bits'][bits]} | {plan['params_per_bits'][bits]:,} |"
            for bits in plan["layers_per_bits"]
        ),
        "",
    ]
    if "calibration" in card:
        lines += ["## Calibration data", "", *(f"- {k}: {v}" for k, v in card["calibration"].items()), ""]
    if "method" in card:
        lines += ["## Method", "", *(f"- {k}: {v}" for k, v in card["method"].items()), ""]
    if "metrics" in card:
        note = card["metrics"].get("note")
        lines += ["## Metrics", "", *_metrics_table(card["metrics"]), *(["", note] if note else []), ""]
    lines += ["## Size", "", "```", bytes_table(card), "```", ""]
    if "deployment" in card:
        lines += ["## Deployment", "", "| target | measure | value |", "|---|---|---|"]
        lines += [
            f"| {target} | {key} | {value} |"
            for target, report in card["deployment"].items()
            for key, value in report.items()
        ]
        lines.append("")
    return "\n".join(lines)


def _origin(card: dict) -> list[str]:
    """Which float weights were quantized: a random init is said in so many words (its metrics are fidelity)."""
    checkpoint = card.get("fp_checkpoint")
    if checkpoint is None:
        return []
    if checkpoint.startswith("none"):
        return [
            "**The float weights were a seeded random init, not a trained SAM2**: this model segments nothing;"
            " only its fidelity to that float model (the 'vs FP' columns) means something.",
            "",
        ]
    return [f"Float weights: `{checkpoint}`.", ""]


def _metrics_table(metrics: dict) -> list[str]:
    rows = metrics.get("table") or []
    if not rows:
        return [f"- {k}: {v:.4f}" for k, v in metrics.get("validation", {}).items()]
    names = (
        "model",
        "memory",
        "weight_avg_bits",
        "act_avg_bits",
        "J&F",
        "fidelity/J&F",
        "mAP",
        "fidelity/mAP",
    )
    columns = [c for c in names if c in rows[0]]
    cells = [
        "| "
        + " | ".join(
            f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c) or "-") for c in columns
        )
        + " |"
        for row in rows
    ]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *cells]


def card_paths(path: Path) -> tuple[Path, Path]:
    stem = path.with_suffix("")
    return stem.with_name(stem.name + "_card.md"), stem.with_name(stem.name + "_card.json")


def write_card(card: dict, path: Path) -> None:
    markdown, data = card_paths(path)
    write_text(markdown, _markdown(card))
    write_text(data, json.dumps(card, indent=1) + "\n")


def add_deployment(path: Path, target: str, summary: dict) -> None:
    """Record a deployment target's measured summary (speed, memory, size, fidelity) in the card of the
    export at `path`, both files."""
    data = card_paths(path)[1]
    card = json.loads(data.read_text())
    card.setdefault("deployment", {})[target] = summary
    write_card(card, path)
