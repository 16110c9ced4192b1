"""The fit pipeline's stages, in order; each reads its inputs, writes one artifact into the run directory
(`mqsam2.rundir.RunDir` names them) and is skipped when that artifact exists, so a restarted run continues where
it stopped. Nothing is written before the config, the model and the data have been checked.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from mqsam2 import api
from mqsam2.allocation import allocate, read_plan, write_plan
from mqsam2.allocation_figures import plot_allocation, plot_sensitivity
from mqsam2.callbacks import OverlayCallback
from mqsam2.config import FitConfig
from mqsam2.data import calibration_set, ensure_synth, validation_set
from mqsam2.distributed import local_rank, rank_and_world, trainer_layout
from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import evaluate_video_grid
from mqsam2.export import export_model
from mqsam2.export.card import bytes_table, card_paths, run_details, run_fp_bytes
from mqsam2.files import save_torch, write_text
from mqsam2.importance import read_importance, write_importance
from mqsam2.methods import get_method
from mqsam2.metrics.coco import MaskMAP, mask_map
from mqsam2.models import build_sam2
from mqsam2.quant import quantize
from mqsam2.reconstruct.units import unit_names
from mqsam2.rundir import RunDir
from mqsam2.validation import EvaluationModule, ValidationData
from mqsam2.wandb_images import log_images
from mqsam2.workload import Workload

log = logging.getLogger("mqsam2")


def prepare_run_dir(config: FitConfig) -> RunDir:
    """The run's directory, claimed for this config (config.yaml written by rank 0): call it once everything
    that can be checked without running a stage has been (`load_float_model`, `check_units`, `load_data`)."""
    run = RunDir.of(config)
    run.claim(config, rank_and_world()[0])
    return run


def check_units(float_model: torch.nn.Module, config: FitConfig) -> None:
    """`reconstruction.units` must name units of this model and mode, a recipe's method's mode in a recipe run
    (listed when one does not)."""
    cfg = config.reconstruction
    mode = cfg.mode if config.recipe.method is None else get_method(config.recipe.method).reconstruction
    if cfg.units is None or mode == "none":
        return
    known = unit_names(float_model, mode, config.quant.keep_fp)
    unknown = [name for name in cfg.units if name not in known]
    if unknown:
        shown = ", ".join(known[:40]) + (f", ... ({len(known)} in all)" if len(known) > 40 else "")
        raise MQSAM2Error(
            f"reconstruction.units names no unit {', '.join(unknown)} of SAM2 {config.model.size} in mode "
            f"{mode}; its units are: {shown or 'none'}"
        )


def load_float_model(config: FitConfig) -> torch.nn.Module:
    model = config.model
    device = (
        "cuda"
        if torch.cuda.is_available() and config.reconstruction.accelerator in ("auto", "gpu", "cuda")
        else "cpu"
    )
    if device == "cuda":
        torch.cuda.set_device(local_rank())
    return build_sam2(
        model.size,
        model.checkpoint,
        model.image_size,
        video=True,
        seed=model.seed,
        version=model.version,
        device=device,
    )


@dataclass
class Datasets:
    calibration: Workload
    val_videos: Sequence  # lazy: each clip is read from its shard when evaluated
    val_images: Sequence


def load_data(config: FitConfig, image_size: int) -> Datasets:
    """Calibration (and, when evaluation runs, validation) sets from the configured shards, or from synthetic
    shards made on demand. The validation set is only selected here (shard and key of each item); its clips
    and images are decoded one at a time when evaluated."""
    data = config.data
    video_shards, image_shards = data.video_shards, data.image_shards
    evaluate = config.evaluation.enabled
    val_videos, val_images = (data.val_video_shards, data.val_image_shards) if evaluate else (None, None)
    if video_shards is None and image_shards is None:
        synth = ensure_synth(
            data.root,
            data.synth_videos,
            data.synth_frames,
            data.synth_size,
            data.seed,
            images=data.synth_images,
            num_objects=tuple(data.synth_objects),
        )
        video_shards, image_shards = synth.videos, synth.images
        if evaluate:
            held_out = ensure_synth(
                data.root,
                data.val_videos,
                data.val_frames,
                data.synth_size,
                data.seed + 1,
                images=data.val_images,
                num_objects=tuple(data.synth_objects),
            )
            val_videos, val_images = held_out.videos, held_out.images
    calib = calibration_set(
        video_shards,
        image_shards,
        data.calib_videos,
        data.calib_frames,
        data.calib_images,
        image_size,
        data.seed,
    )
    val = (
        validation_set(
            val_videos, val_images, data.val_videos, data.val_frames, data.val_images, image_size, data.seed
        )
        if val_videos or val_images
        else None
    )
    log.info(
        "data: calibration %d videos x %d frames + %d images; validation %d videos + %d images",
        len(calib.videos),
        data.calib_frames,
        len(calib.images),
        len(val.videos) if val else 0,
        len(val.images) if val else 0,
    )
    return Datasets(
        Workload(calib.videos, calib.images, prompt=data.prompt, max_objects=data.calib_objects),
        val.videos if val else [],
        val.images if val else [],
    )


def stage_importance(model: torch.nn.Module, config: FitConfig, workload: Workload, run: RunDir) -> dict:
    """Eq. 2-4 on every layer that will be quantized, streamed over the calibration set."""
    path = run.importance
    if path.exists():
        log.info("importance: reusing %s", path)
        return read_importance(path)
    importance = api.measure_importance(model, workload, config.quant)
    if rank_and_world()[0] == 0:
        write_importance(importance, path)
    log.info("importance: scored %d layers -> %s", len(importance), path)
    return importance


def stage_allocation(
    importance: dict, config: FitConfig, run: RunDir, loggers: list[Logger] = ()
) -> dict[str, int]:
    """Eq. 6 as configured; writes plan.json and the Figure-3-style allocation.png."""
    path = run.plan
    if path.exists():
        log.info("allocation: reusing %s", path)
        return read_plan(path)
    cfg = config.allocation
    allocation = allocate(
        importance, method=cfg.method, target_avg=cfg.target_avg, candidates=cfg.candidates, error=cfg.error
    )
    if rank_and_world()[0] == 0:
        plot_allocation(
            list(allocation.names),
            list(allocation.bits),
            [importance[n].score for n in allocation.names],
            run.allocation_figure,
            title=f"{config.name}: {cfg.method}, target {cfg.target_avg} bits",
        )
        plot_sensitivity(allocation, importance, run.sensitivity_figure)
        write_plan(allocation, path)
        log_images(loggers, "allocation", [run.allocation_figure, run.sensitivity_figure])
    log.info(
        "allocation: %s -> %.3f average bits (objective %.4g, %.2f s), layers per width %s",
        cfg.method,
        allocation.average_bits,
        allocation.objective,
        allocation.solve_seconds,
        allocation.layers_per_width,
    )
    return allocation.plan


def stage_quantize(
    float_model: torch.nn.Module, plan: dict[str, int], config: FitConfig, workload: Workload, run: RunDir
) -> torch.nn.Module:
    """Swap in quantized modules with the plan's widths, then initialise every quantizer with the observers."""
    quant_config = dataclasses.replace(config.quant, plan=plan)
    path = run.calibrated
    if path.exists():
        model = quantize(copy.deepcopy(float_model), quant_config)
        model.load_state_dict(run.load_state(path))
        log.info("quantize: reusing calibrated quantizers from %s", path)
        return model
    model = api.quantize_calibrated(float_model, quant_config, workload)
    if rank_and_world()[0] == 0:
        save_torch(model.state_dict(), path)
    log.info(
        "quantize: %d layers, weights %s / activations %s observers -> %s",
        len(plan),
        config.quant.weight_observer,
        config.quant.act_observer,
        path,
    )
    return model


def stage_reconstruct(
    model: torch.nn.Module,
    float_model: torch.nn.Module,
    config: FitConfig,
    workload: Workload,
    run: RunDir,
    loggers: list[Logger],
) -> None:
    if config.reconstruction.mode == "none":
        log.info("reconstruction: mode none (calibration only)")
        return
    api.reconstruct(model, float_model, workload, config.reconstruction, run, loggers, seed=config.seed)


def stage_recipe(
    float_model: torch.nn.Module,
    config: FitConfig,
    workload: Workload,
    run: RunDir,
    loggers: list[Logger],
) -> torch.nn.Module:
    """`recipe.method`'s whole recipe, as a compare row runs it (`api.quantize_sam2`), in the run directory:
    a restarted run reuses its calibrated model and finished units. plan.json records the widths the model
    was quantized with, for the table and the model card."""
    recipe = api.recipe_of(config.recipe, config.quant, config.reconstruction, config.seed)
    result = api.quantize_sam2(float_model, workload, recipe, run, loggers=loggers)
    if rank_and_world()[0] == 0 and not run.plan.exists():
        write_plan(api.applied_allocation(recipe, result.allocation), run.plan)
    return result.model


def summary(run: RunDir) -> dict:
    return {"run_dir": str(run.path), "units": run.unit_records()}


def run_label(config: FitConfig) -> str:
    """This run's model as the table names it: the paper's recipe by its budget, a recipe by its method and
    width (Avg-b for a mixed method, WbAa for a uniform one)."""
    recipe = config.recipe
    if recipe.method is None:
        return f"mixqsam2 Avg-{config.allocation.target_avg:g}"
    if get_method(recipe.method).mixed:
        return f"{recipe.method} Avg-{recipe.bits:g}"
    return f"{recipe.method} W{recipe.bits:g}A{recipe.act_bits or recipe.bits:g}"


def mixed_row(config: FitConfig, run: RunDir) -> dict:
    """This run's model in the table: named by method and budget, with what its allocation spends on weights
    (parameter-weighted) and on activations (element-weighted) from plan.json, beside the uniform rows'
    widths: a shared-width plan meets the budget on weights only, so its activations may average more."""
    weights, acts = run.bit_averages()
    spent = f" (W{weights:.2f}/A{acts:.2f})" if weights is not None and acts is not None else ""
    return {
        "model": f"{run_label(config)}{spent}",
        "weight_avg_bits": weights,
        "act_avg_bits": acts,
    }


def bits_note(rows: list[dict]) -> str:
    """The caveat under a table whose quantized rows do not spend the same bits on both axes ('' if they do)."""
    spent = [row for row in rows if row.get("weight_avg_bits") is not None]
    weights = sorted({f"{row['weight_avg_bits']:.2f}" for row in spent})
    acts = sorted({f"{row['act_avg_bits']:.2f}" for row in spent if row.get("act_avg_bits") is not None})
    if len(weights) < 2 and len(acts) < 2:
        return ""
    return (
        f"not an equal-bit comparison: the quantized rows' weights average {' / '.join(weights)} bits, their "
        f"activations {' / '.join(acts)} bits (columns W bits, A bits)"
    )


def uniform_baseline(
    float_model: torch.nn.Module, bits: int, config: FitConfig, workload: Workload
) -> torch.nn.Module:
    """W{bits}A{bits} with the run's observers and no reconstruction: the reference point of the table."""
    return api.quantize_calibrated(
        float_model, dataclasses.replace(config.quant, bits=bits, plan=None), workload
    )


def stage_evaluate(
    model: torch.nn.Module,
    float_model: torch.nn.Module,
    config: FitConfig,
    data: Datasets,
    run: RunDir,
    loggers: list[Logger],
) -> dict:
    """Lightning validation loop (SIS active) over the validation items, then the comparison table."""
    cfg = config.evaluation
    if not cfg.enabled or not (data.val_videos or data.val_images):
        log.info("evaluation: skipped (%s)", "disabled" if not cfg.enabled else "no validation data")
        return {}
    settings = dataclasses.asdict(cfg)
    if run.metrics.is_file():
        stored = json.loads(run.metrics.read_text())
        if stored.get("evaluation") == settings:
            log.info("evaluation: reusing %s", run.metrics)
            return stored
        if rank_and_world()[0] == 0:
            shutil.rmtree(run.eval_dir, ignore_errors=True)  # the logs and overlays of other settings
    images = data.val_images if cfg.images else []
    log.info(
        "evaluation: %d clips and %d images; the validation loop, then %d models x memory %s",
        len(data.val_videos),
        len(images),
        2 + len(cfg.baselines),
        ", ".join(cfg.memory),
    )
    module = EvaluationModule(
        model,
        float_model,
        prompt=config.data.prompt,
        detections=cfg.detections,
        memory_policy="sis" if "sis" in cfg.memory else cfg.memory[0],
    )
    trainer = L.Trainer(
        accelerator=config.reconstruction.accelerator,
        **trainer_layout(config.reconstruction.strategy),
        use_distributed_sampler=False,  # ValidationData shards the items itself, without repeating any
        logger=[CSVLogger(run.path, name=run.eval_dir.name, version=""), *loggers],
        callbacks=[OverlayCallback(cfg.overlays)],
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    device = next(model.parameters()).device
    trainer.validate(module, datamodule=ValidationData(data.val_videos, images), verbose=False)
    for evaluated in (model, float_model):  # Lightning's teardown left them on the CPU
        evaluated.to(device)
    validation = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # The comparison table: every rank scores its share of the clips and images, the metrics sum over ranks.
    rank, world = rank_and_world()
    models, spent = {"FP": float_model}, {"FP": {"weight_avg_bits": None, "act_avg_bits": None}}
    for bits in cfg.baselines:
        name = f"W{bits}A{bits} ({config.quant.act_observer})"
        models[name] = uniform_baseline(float_model, bits, config, data.calibration)
        spent[name] = {"weight_avg_bits": float(bits), "act_avg_bits": float(bits)}
    mixed = mixed_row(config, run)
    models[mixed["model"]] = model
    spent[mixed["model"]] = {k: v for k, v in mixed.items() if k != "model"}
    clips, image_share = data.val_videos[rank::world], images[rank::world]
    rows = (
        evaluate_video_grid(models, clips, float_model, cfg.memory, config.data.prompt, device)
        if data.val_videos
        else []
    )
    if images:
        for name, candidate in models.items():
            log.info("evaluate: %s, mask mAP on %d images", name, len(image_share))
            stats = mask_map(candidate, image_share, cfg.detections, metric=MaskMAP().to(device))
            fidelity = mask_map(
                candidate, image_share, cfg.detections, reference=float_model, metric=MaskMAP().to(device)
            )
            for row in rows:
                if row["model"] == name:
                    row |= {"mAP": stats["mAP"], "fidelity/mAP": fidelity["mAP"]}
    for row in rows:
        row |= spent.get(row["model"], {})
    results = {"validation": validation, "table": rows, "note": bits_note(rows), "evaluation": settings}
    if rank != 0:
        return {"validation": validation}
    write_text(run.metrics, json.dumps(results, indent=1) + "\n")
    caveat = (
        "" if config.model.checkpoint else "; random-init weights: only the 'vs FP' columns mean something"
    )
    note = f"\n{results['note']}" if results["note"] else ""
    log.info("evaluation (validation set%s):\n%s%s", caveat, format_table(rows), note)
    return results


def stage_export(model: torch.nn.Module, config: FitConfig, run: RunDir) -> dict:
    """The deployable packed export and its model card in export/ (docs/export.md); rank 0 writes it. Its
    card is written last, so a run stopped halfway through the export writes it again."""
    path = run.export
    card_json = card_paths(path)[1]
    if card_json.exists():
        log.info("export: reusing %s", path)
        return json.loads(card_json.read_text())["bytes"]
    if rank_and_world()[0] != 0:
        return {}
    card = export_model(model, path, run_details(config, run), fp_bytes=run_fp_bytes(config))
    log.info("export: %s\n%s", path, bytes_table(card))
    return card["bytes"]


def format_table(rows: list[dict]) -> str:
    columns = [
        ("model", "model", "{}"),
        ("memory", "memory", "{}"),
        ("weight_avg_bits", "W bits", "{:.2f}"),
        ("act_avg_bits", "A bits", "{:.2f}"),
        ("J&F", "J&F vs GT", "{:.3f}"),
        ("fidelity/J&F", "J&F vs FP", "{:.3f}"),
        ("mAP", "mAP vs GT", "{:.3f}"),
        ("fidelity/mAP", "mAP vs FP", "{:.3f}"),
    ]
    present = [c for c in columns if any(c[0] in row for row in rows)]
    cells = [[title for _, title, _ in present]] + [
        [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in present] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(present))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
