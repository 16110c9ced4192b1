"""Sequential capture on random-init SAM2.1-tiny: derived calibration tensors must equal what a pass of the
model gives, and a restarted run must derive what an uninterrupted one did."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from mqsam2.config import ReconstructionConfig
from mqsam2.data import calibration_set, ensure_synth
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantize
from mqsam2.reconstruct.cache import UnitCache
from mqsam2.reconstruct.capture import Capturer, chain_cache, record_units
from mqsam2.reconstruct.driver import Reconstructor
from mqsam2.reconstruct.units import Unit, reconstruction_units
from mqsam2.rundir import RunDir
from mqsam2.workload import Workload

# The same tensors computed in float32 over differently composed batches (the chain runs 8 samples at a time,
# the image encoder 4, the tracker 1): matmul blocking reassociates sums, ~1e-6 relative per layer, through
# at most a dozen blocks.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """One 3-frame clip and one image: every unit is called, each model pass takes seconds."""
    shards = ensure_synth(tmp_path_factory.mktemp("synth"), videos=1, frames=3, size=256, images=1)
    data = calibration_set(shards.videos, shards.images, 1, 3, 1, image_size=256, seed=0)
    return Workload(data.videos, data.images, max_objects=1)


@pytest.fixture(scope="module")
def calibrated(workload):
    float_model = build_sam2("t", image_size=256)
    model = quantize(copy.deepcopy(float_model), QuantConfig(bits=4))
    with calibration(model):
        workload.run_full(model)
    return float_model, model


@torch.no_grad()
def _reconstruct_at_random(unit: Unit, seed: int) -> None:
    """Stand-in for a fitted unit: every layer hardened to random rounding decisions, which moves the unit's
    outputs as reconstruction does, at no cost."""
    generator = torch.Generator().manual_seed(seed)
    for layer in unit.layers.values():
        alpha = layer.weight_quantizer.start_adaround(layer.weight)
        alpha.copy_(torch.randn(alpha.shape, generator=generator))
        layer.harden_rounding()


def _assert_same_cache(derived: UnitCache, reference: UnitCache) -> None:
    assert len(derived) == len(reference), derived.unit_name
    for mine, theirs in zip(derived.quant, reference.quant, strict=True):
        for x, y in zip(mine.inputs, theirs.inputs, strict=True):
            torch.testing.assert_close(x, y, **TOLERANCE, msg=derived.unit_name)
    for mine, theirs in zip(derived.float, reference.float, strict=True):
        for x, y in zip(mine.inputs + mine.outputs, theirs.inputs + theirs.outputs, strict=True):
            torch.testing.assert_close(x, y, **TOLERANCE, msg=derived.unit_name)


def test_image_encoder_is_derived_without_a_pass_and_equals_a_replay(calibrated, workload):
    """Each Hiera block is captured while the blocks before it are "reconstructed"; block 3 (the first of a
    stage, fed by a stage end) and the neck (gathering every stage end) must then hold what one pass of the
    image encoder records."""
    float_model, model = calibrated[0], copy.deepcopy(calibrated[1])
    units = [unit for unit in reconstruction_units(model) if unit.encoder_only]
    capturer = Capturer(model, float_model, workload, units, mode="sequential")
    derived = {}
    for seed, unit in enumerate(units):
        derived[unit.name] = capturer.capture(unit)
        _reconstruct_at_random(unit, seed)
    assert units[-1].gathers == tuple(f"image_encoder.trunk.blocks.{i}" for i in (0, 2, 9, 11))
    names = ["image_encoder.trunk.blocks.3", "image_encoder.neck"]
    with record_units(model, names) as quant:
        workload.run_encoder(model)
    with record_units(float_model, names) as floats:
        workload.run_encoder(float_model)
    for name in names:
        _assert_same_cache(derived[name], UnitCache(quant[name], floats[name], True, name))


def test_within_frame_chains_reproduce_the_calls_sam2_makes(calibrated, workload):
    """ "shared" capture derives memory-attention layers 1-3, decoder block 1 and the final attention from the
    previous unit's call and output: on an unchanged model that must give exactly the recorded calls."""
    float_model, model = calibrated
    units = {unit.name: unit for unit in reconstruction_units(model) if unit.video_loop}
    chained = [unit for unit in units.values() if unit.follows is not None]
    assert [unit.name for unit in chained] == [
        "memory_attention.layers.1",
        "memory_attention.layers.2",
        "memory_attention.layers.3",
        "sam_mask_decoder.transformer.layers.1",
        "sam_mask_decoder.transformer.final_attn_token_to_image",
    ]
    names = sorted({unit.name for unit in chained} | {unit.follows for unit in chained})
    with record_units(model, names) as quant:
        workload.run_full(model)
    with record_units(float_model, names) as floats:
        workload.run_full(float_model)
    recorded = {name: UnitCache(quant[name], floats[name], units[name].batchable, name) for name in names}
    for unit in chained:
        before = units[unit.follows]
        float_unit = float_model.get_submodule(unit.name)
        derived = chain_cache(recorded[before.name], before.module, float_unit, unit.link, unit.name)
        _assert_same_cache(derived, recorded[unit.name])


def _reconstructor(calibrated, workload, run_dir, capture, callbacks=None):
    config = ReconstructionConfig(
        iters=4, batch_size=2, checkpoint_every=2, accelerator="cpu", capture=capture
    )
    float_model, model = calibrated
    units = ["memory_attention.layers.0", "memory_attention.layers.1"]
    return Reconstructor(
        copy.deepcopy(model), float_model, workload, config, RunDir(run_dir), only=units, callbacks=callbacks
    )


def test_loop_units_see_the_model_with_every_earlier_unit_reconstructed(calibrated, workload, tmp_path):
    """ "sequential": memory-attention layer 1's quantized inputs come from a pass with layer 0 already
    reconstructed, its float calls from the one float pass; both equal a replay of both models."""
    reconstructor = _reconstructor(calibrated, workload, tmp_path, "sequential")
    first, second = reconstructor.units
    _reconstruct_at_random(first, seed=0)
    replay = Capturer(reconstructor.model, reconstructor.float_model, workload, [second], mode="replay")
    _assert_same_cache(reconstructor.capture(second), replay.capture(second))


def test_shared_capture_resumes_mid_way_to_the_same_tensors(calibrated, workload, tmp_path):
    """ "shared": one replay, made before the first loop unit, feeds layer 1 through the chain from the fitted
    layer 0. A run killed in layer 1's fit must, restarted, replay the model as it was before layer 0 was
    fitted (not with layer 0 loaded) and end bit-identical to an uninterrupted run."""
    straight = _reconstructor(calibrated, workload, tmp_path / "straight", "shared")
    straight.run()

    class Interrupt(Exception):
        pass

    class DieInSecondUnit(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if module.unit.name == "memory_attention.layers.1" and trainer.global_step == 3:
                raise Interrupt

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        _reconstructor(calibrated, workload, resumed_dir, "shared", [DieInSecondUnit()]).run()
    resumed = _reconstructor(calibrated, workload, resumed_dir, "shared")
    resumed.run()
    for unit in straight.units:
        a = unit.module.state_dict()
        b = resumed.model.get_submodule(unit.name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), unit.name


def test_a_pass_over_its_host_budget_leaves_the_largest_unit_for_later():
    """One pass records several units; past the budget the unit holding the most is dropped whole (it gets
    a pass of its own at its turn), and the others keep every call."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Linear(64, 2))
    per_call = {"0": (4 + 64) * 4, "1": (64 + 2) * 4}  # float32 input and output bytes of one call
    # 1100 bytes hold four calls of unit 1 (1056) but not three of unit 0 beside them: 0 goes at its third call
    with torch.no_grad(), record_units(model, ["0", "1"], budget_bytes=1100) as recorded:
        for _ in range(4):
            model(torch.randn(1, 4))
    assert set(recorded) == {"1"}
    assert len(recorded["1"]) == 4
    assert sum(x.nbytes for call in recorded["1"] for x in call.inputs + call.outputs) == 4 * per_call["1"]
    with torch.no_grad(), record_units(model, ["0", "1"], budget_bytes=None) as recorded:
        model(torch.randn(1, 4))
    assert set(recorded) == {"0", "1"}
