"""The library front door: the whole recipe (importance -> allocation -> quantize -> calibrate -> reconstruct)
as functions on a float SAM2 and a calibration `Workload`, with no run directory and no CLI.

    from mqsam2.api import Recipe, quantize_sam2
    result = quantize_sam2(float_model, workload, Recipe(method="mixqsam2-measured", bits=4))
    result.model  # the quantized, calibrated, reconstructed SAM2 (the float model is left untouched)

The fit CLI's stages, the compare grid and the benchmarks call these functions; the method registry
(`mqsam2.methods`) says what each method does at each step.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mqsam2.allocation import MEASURED_ERRORS, Allocation, allocate, default_candidates, write_plan
from mqsam2.allocation_figures import plot_sensitivity
from mqsam2.config import RecipeConfig, ReconstructionConfig
from mqsam2.errors import MQSAM2Error
from mqsam2.files import save_torch
from mqsam2.importance import ImportanceCollector, LayerImportance
from mqsam2.memory.policies import set_memory_policy
from mqsam2.methods import Method, get_method
from mqsam2.propagation import measure_gains, measure_mask_kl
from mqsam2.quant import calibration, quantizable_layers, quantize
from mqsam2.quant.swap import QuantConfig
from mqsam2.rundir import RunDir
from mqsam2.sensitivity import calibrate_quantizers, measure_layer_errors
from mqsam2.stages import stage
from mqsam2.workload import Workload

log = logging.getLogger(__name__)
GAIN_SAMPLES = (1, 8, 4)  # downstream gains: the first clip's first 8 frames and the first 4 images


@dataclass
class Recipe:
    """One quantization: a registered method at a width (uniform WbAb, or the Avg-b target of a mixed method),
    on top of shared quantizer and reconstruction settings. `act_bits` gives a uniform method's activations
    their own width (WbAa, e.g. W2A4)."""

    method: str | Method = "mixqsam2-measured"
    bits: float = 4
    candidates: list[int] | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    seed: int = 0
    learn: bool = True  # False stops after calibration: the round-to-nearest ablation of a learning method
    act_bits: int | None = None

    def __post_init__(self) -> None:
        if self.act_bits is not None and self.resolved.mixed:
            raise MQSAM2Error(
                f"act_bits applies to uniform methods; {self.resolved.name} allocates activation widths itself"
            )

    @property
    def resolved(self) -> Method:
        return get_method(self.method)

    def candidate_widths(self) -> list[int]:
        """Mixed: the given candidates or one bit either side of the target ({3,4,5} for Avg-4); uniform: b."""
        if not self.resolved.mixed:
            return [int(self.bits)]
        return sorted(self.candidates or default_candidates(self.bits))


def recipe_of(
    section: RecipeConfig, quant: QuantConfig, reconstruction: ReconstructionConfig, seed: int = 0
) -> Recipe:
    """The `Recipe` a recipe section names, on shared quantizer and reconstruction settings: the one reading of
    a fit's `recipe` and of a compare row, so both entry points run a method alike. `iters` replaces the
    reconstruction's iterations (0: calibration only), `activations` the mixed method's activation mode."""
    if section.iters:
        reconstruction = dataclasses.replace(reconstruction, iters=section.iters)
    method = get_method(section.method)
    if section.activations:
        method = dataclasses.replace(method, activations=section.activations)
    return Recipe(
        method,
        section.bits,
        section.candidates,
        quant,
        reconstruction,
        seed,
        learn=section.iters != 0,
        act_bits=section.act_bits,
    )


@dataclass
class QuantizedSAM2:
    """What the recipe produced: the model and the allocation it was quantized with."""

    model: nn.Module
    allocation: Allocation


def measure_importance(
    model: nn.Module,
    workload: Workload,
    quant: QuantConfig,
    measured_widths: Sequence[int] | None = None,
    gain_samples: Sequence[int] | None = None,
    mask_samples: Sequence[int] | None = None,
    mask_widths: Sequence[int] | None = None,
) -> dict[str, LayerImportance]:
    """Eq. 2-4 for every layer the config would quantize (unreached layers left out, so they stay float), plus
    the measured error tables at `measured_widths` when given (`allocation.error: measured`), each layer's
    downstream gain when `gain_samples` = (clips, frames, images) says on which samples to measure it
    (`allocation.error: propagated`; `Workload.samples`; a layer those never reach gets the largest gain, so
    it is never cheap for lack of data), and each layer's mask KL on `mask_samples` at `mask_widths` (default:
    `measured_widths`, which must hold them; `allocation.error: mask`; a layer those samples never reach gets
    the largest KL of its width)."""
    layers = quantizable_layers(model, quant.keep_fp)
    with ImportanceCollector(model, layers) as collector:
        workload.run_full(model)
    importance = collector.compute(required=[*(quant.plan or {}), *(quant.act_plan or {})])
    reached = {name: layers[name] for name in importance}
    if measured_widths:
        run = functools.partial(workload.run_full, model)
        quantizers = calibrate_quantizers(reached, run, measured_widths, quant)
        errors = measure_layer_errors(reached, run, measured_widths, quant, quantizers)
        importance = {
            name: layer._replace(weight_errors=errors[name][0], act_errors=errors[name][1])
            for name, layer in importance.items()
        }
        if mask_samples:
            samples = workload.samples(*mask_samples)
            kl = measure_mask_kl(
                model, [lambda s=s: s.run_full(model) for s in samples], reached, quantizers, mask_widths
            )
            importance = {
                name: layer._replace(
                    weight_mask_kl=_or_largest(kl, name, 0), act_mask_kl=_or_largest(kl, name, 1)
                )
                for name, layer in importance.items()
            }
    if gain_samples:
        samples = workload.samples(*gain_samples)
        measured = measure_gains(model, [lambda s=s: s.run_full(model) for s in samples], reached)
        largest = max(measured.values())
        importance = {
            name: layer._replace(gain=measured.get(name, largest)) for name, layer in importance.items()
        }
    return importance


def _or_largest(tables: dict[str, tuple[dict[str, float], ...]], name: str, side: int) -> dict[str, float]:
    """The layer's measured table, or, for a layer the samples never reached, the largest of each width."""
    if name in tables:
        return tables[name][side]
    widths = next(iter(tables.values()))[side]
    return {bits: max(t[side][bits] for t in tables.values()) for bits in widths}


def allocate_bits(importance: dict[str, LayerImportance], recipe: Recipe) -> Allocation:
    """The method's allocation: Eq. 6 for mixed methods, every layer at b for uniform ones."""
    method = recipe.resolved
    if method.allocator is not None:
        raise MQSAM2Error(
            f"{method.name} allocates from the model, not from Eq. 2-4 importance: call "
            f"get_method({method.name!r}).allocator(float_model, workload, recipe)"
        )
    if not method.mixed:
        return allocate(
            importance, method="uniform", target_avg=int(recipe.bits), candidates=[int(recipe.bits)]
        )
    return allocate(
        importance,
        method="ilp",
        target_avg=recipe.bits,
        candidates=recipe.candidate_widths(),
        error=method.error,
        activations=method.activations,
    )


def applied_allocation(recipe: Recipe, allocation: Allocation) -> Allocation:
    """The widths the recipe quantizes with: the allocation, with a uniform recipe's `act_bits` on every input
    when given."""
    if recipe.act_bits is None:
        return allocation
    inputs = len(allocation.act_bits or allocation.bits)
    return dataclasses.replace(
        allocation, act_bits=(recipe.act_bits,) * inputs, act_average_bits=float(recipe.act_bits)
    )


def quant_config(recipe: Recipe, allocation: Allocation) -> QuantConfig:
    """The shared quantizer settings with the method's observers and the allocation's per-layer widths (a
    uniform recipe's `act_bits` for every input when given)."""
    method = recipe.resolved
    return dataclasses.replace(
        recipe.quant,
        bits=max(allocation.bits),
        plan=allocation.plan,
        act_plan=applied_allocation(recipe, allocation).act_plan,
        weight_observer=method.weight_observer,
        act_observer=method.act_observer,
        quantize_attention=recipe.quant.quantize_attention or method.quantize_attention,
        attention_probs=method.attention_probs or recipe.quant.attention_probs,
    )


def quantize_calibrated(
    float_model: nn.Module, config: QuantConfig, workload: Workload, method: Method | None = None
) -> nn.Module:
    """A quantized copy of the float model with every quantizer initialised from the calibration passes."""
    model = copy.deepcopy(float_model)
    if method is not None and method.before_quantize is not None:
        method.before_quantize(model, workload)
    quantize(model, config)
    with calibration(model, config):
        workload.run_full(model)
    if method is not None and method.after_calibration is not None:
        method.after_calibration(model, workload)
    return model


def reconstruct(
    model: nn.Module,
    float_model: nn.Module,
    workload: Workload,
    config: ReconstructionConfig,
    workdir: str | Path | RunDir,
    loggers: Sequence = (),
    seed: int = 0,
) -> None:
    """Block-wise reconstruction of every unit (resumable in `workdir`, a fit's run directory or any folder);
    nothing for mode `none`."""
    if config.mode == "none":
        return
    from mqsam2.reconstruct.driver import Reconstructor

    run = workdir if isinstance(workdir, RunDir) else RunDir(workdir)
    reconstructor = Reconstructor(
        model, float_model, workload, config, run, list(loggers), seed=seed, only=config.units
    )
    log.info("reconstruction: %s over %d units", config.mode, len(reconstructor.units))
    reconstructor.run()


def unit_reconstruction(recipe: Recipe) -> ReconstructionConfig:
    """What the recipe learns per unit: the shared reconstruction settings with the method's mode (`none`
    when the recipe stops after calibration) and video loss."""
    method = recipe.resolved
    return dataclasses.replace(
        recipe.reconstruction,
        mode=method.reconstruction if recipe.learn else "none",
        video_loss=method.video_loss,
    )


def recipe_identity(recipe: Recipe) -> str:
    """What a calibrated model depends on besides the float model and the data: the method's settings, the
    widths, the quantizer settings and the seed (reconstruction settings are not part of it)."""
    method = recipe.resolved
    settings = {
        f.name: getattr(method, f.name)
        for f in dataclasses.fields(method)
        if not callable(getattr(method, f.name))
    }
    payload = {
        "method": settings,
        "bits": recipe.bits,
        "widths": recipe.candidate_widths(),
        "act_bits": recipe.act_bits,
        "quant": dataclasses.asdict(recipe.quant),
        "seed": recipe.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored_calibration(
    run: RunDir | None, recipe: Recipe, device: torch.device
) -> tuple[nn.Module, Allocation] | None:
    """The calibrated model and allocation an earlier call left in `run` for this recipe, if any, on `device`
    (the float model's: a resumed row must track and train where a fresh one does)."""
    if run is None or not run.calibrated_model.exists():
        return None
    stored = torch.load(run.calibrated_model, map_location=device, weights_only=False)
    if stored["recipe"] != recipe_identity(recipe):
        log.info("quantize: %s belongs to another recipe, calibrating again", run.calibrated_model)
        return None
    log.info("quantize: reusing the calibrated model in %s", run.calibrated_model)
    return stored["model"], stored["allocation"]


def _allocate_and_calibrate(
    float_model: nn.Module, workload: Workload, recipe: Recipe, importance: dict[str, LayerImportance] | None
) -> tuple[nn.Module, Allocation, dict[str, LayerImportance] | None]:
    """The calibrated model, its allocation and the importance the allocation read (None for a method with
    its own allocator)."""
    method = recipe.resolved
    if method.allocator is not None:
        allocation, importance = method.allocator(float_model, workload, recipe), None
    else:
        measured = recipe.candidate_widths() if method.error in MEASURED_ERRORS else None
        gains = GAIN_SAMPLES if method.error == "propagated" else None
        masks = GAIN_SAMPLES if method.error == "mask" else None
        first = next(iter(importance.values())) if importance else None
        if (
            first is None
            or (measured and not first.weight_errors)
            or (gains and first.gain is None)
            or (masks and first.act_mask_kl is None)
        ):
            importance = measure_importance(float_model, workload, recipe.quant, measured, gains, masks)
        allocation = allocate_bits(importance, recipe)
    model = quantize_calibrated(float_model, quant_config(recipe, allocation), workload, method)
    return model, allocation, importance


def _write_allocation(run: RunDir, allocation: Allocation, importance: dict[str, LayerImportance]) -> None:
    """A mixed row's plan.json and its sensitivity picture (why each layer got its width) in its folder."""
    write_plan(allocation, run.plan)
    plot_sensitivity(allocation, importance, run.sensitivity_figure)


def quantize_sam2(
    float_model: nn.Module,
    workload: Workload,
    recipe: Recipe,
    workdir: str | Path | RunDir | None = None,
    importance: dict[str, LayerImportance] | None = None,
    loggers: Sequence = (),
) -> QuantizedSAM2:
    """The whole recipe of `recipe.method`; `workdir` (one per float model and data set) keeps the calibrated
    model and the reconstruction resumable (a temporary one if None), `importance` reuses Eq. 2-4 measurements
    made earlier on the same model and data (methods with their own `allocator` measure their own), `loggers`
    receive the reconstruction's curves."""
    method = recipe.resolved
    run = None if workdir is None else workdir if isinstance(workdir, RunDir) else RunDir(workdir)
    stored = _stored_calibration(run, recipe, next(float_model.parameters()).device)
    if stored is not None:
        model, allocation = stored
    else:
        with stage("calibrate"):
            model, allocation, importance = _allocate_and_calibrate(float_model, workload, recipe, importance)
        if run is not None and method.mixed and importance is not None:
            _write_allocation(run, allocation, importance)
        if run is not None:
            save_torch(
                {"recipe": recipe_identity(recipe), "model": model, "allocation": allocation},
                run.calibrated_model,
            )
    rec = unit_reconstruction(recipe)
    if run is None:
        with tempfile.TemporaryDirectory(prefix="mqsam2-") as tmp:
            reconstruct(model, float_model, workload, rec, tmp, loggers, seed=recipe.seed)
    else:
        reconstruct(model, float_model, workload, rec, run, loggers, seed=recipe.seed)
    if method.memory_policy is not None:
        set_memory_policy(model, method.memory_policy)
    return QuantizedSAM2(model, allocation)
