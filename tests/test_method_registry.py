"""The methods that predate the registry give the same result through it (`mqsam2.api`) as through the manual
path they used before: quantize + calibration with the method's observers, and `allocate` with its keys."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mqsam2 import api
from mqsam2.allocation import allocate
from mqsam2.api import Recipe, allocate_bits, measure_importance, quant_config, quantize_sam2
from mqsam2.data import calibration_set, ensure_synth
from mqsam2.quant import QuantConfig, calibration, quantize
from mqsam2.workload import Workload

# OMSE differs from these only by its observer names, and its per-channel weight search takes minutes here
OBSERVERS = {
    "minmax": ("minmax", "minmax"),
    "percentile": ("percentile", "percentile"),
    "dynamic": ("minmax", "dynamic"),
}


@pytest.fixture(scope="module")
def image_workload(tmp_path_factory):
    shards = ensure_synth(tmp_path_factory.mktemp("synth"), videos=1, frames=4, size=256, images=1)
    data = calibration_set(shards.videos, shards.images, 1, 3, 1, image_size=128, seed=0)
    return Workload([], data.images, max_objects=1)


@pytest.fixture(scope="module")
def float_model():
    from mqsam2.models import build_sam2

    return build_sam2("t", image_size=128)  # every layer of the 256-px model, a third of the CPU time


@pytest.fixture(scope="module")
def importance(float_model, image_workload):
    return measure_importance(float_model, image_workload, QuantConfig(), measured_widths=[3, 4, 5])


@pytest.mark.parametrize("method", list(OBSERVERS))
def test_uniform_methods_match_the_manual_path_bit_for_bit(method, float_model, image_workload, importance):
    recipe = Recipe(method=method, bits=4, quant=QuantConfig(observer_sample_size=4096))
    through_registry = quantize_sam2(float_model, image_workload, recipe, importance=importance).model
    weight_observer, act_observer = OBSERVERS[method]
    manual = quantize(
        copy.deepcopy(float_model),
        QuantConfig(
            bits=4, weight_observer=weight_observer, act_observer=act_observer, observer_sample_size=4096
        ),
    )
    with calibration(manual):
        image_workload.run_full(manual)
    expected = manual.state_dict()
    state = through_registry.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)


def test_mixed_methods_allocate_as_allocate_does(importance):
    # the mask KL tables stand in as the layer errors: what matters here is which table each method reads
    importance = {
        n: i._replace(weight_mask_kl=i.weight_errors, act_mask_kl=i.act_errors) for n, i in importance.items()
    }
    for method, error, activations in (
        ("mixqsam2", "pow2", "shared"),
        ("mixqsam2-measured", "measured", "separate"),
        ("mixqsam2-mask", "mask", "separate"),
    ):
        recipe = Recipe(method=method, bits=4)
        via_registry = allocate_bits(importance, recipe)
        direct = allocate(
            importance, method="ilp", target_avg=4, candidates=[3, 4, 5], error=error, activations=activations
        )
        assert (via_registry.bits, via_registry.act_bits) == (direct.bits, direct.act_bits)
        config = quant_config(recipe, via_registry)
        assert (config.plan, config.act_plan) == (direct.plan, direct.act_plan)
        assert not config.quantize_attention and config.attention_probs == "uniform"


@pytest.mark.parametrize("method", ["minmax", "ptq4sam"])
def test_a_workdir_keeps_the_calibrated_model_for_the_same_recipe_only(
    method, float_model, image_workload, tmp_path
):
    """A second call with the same recipe loads the calibrated model (no calibration pass) and gives the same
    state; another width calibrates again (MinMax). PTQ4SAM's quantized attention must survive the round trip."""
    calibrations = []
    calibrate = api.quantize_calibrated

    def counted(*args, **kwargs):
        calibrations.append(args[1].bits)
        return calibrate(*args, **kwargs)

    recipe = Recipe(method=method, bits=4, quant=QuantConfig(observer_sample_size=4096), learn=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "quantize_calibrated", counted)
        first = quantize_sam2(float_model, image_workload, recipe, tmp_path).model
        again = quantize_sam2(float_model, image_workload, recipe, tmp_path).model
        assert len(calibrations) == 1
        if method == "minmax":  # PTQ4SAM's log2 search makes a second width cost minutes here
            quantize_sam2(float_model, image_workload, dataclasses.replace(recipe, bits=6), tmp_path)
            assert calibrations == [4, 6]
    expected, state = first.state_dict(), again.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    image = image_workload.images[0]
    with torch.inference_mode():
        features = [m.forward_image(image.image[None])["vision_features"] for m in (first, again)]
    assert torch.equal(*features)


@pytest.mark.gpu
def test_a_resumed_row_runs_on_the_float_models_device(float_model, image_workload, tmp_path):
    """The calibrated model is stored from the CPU; a row that resumes from it must track and train on the GPU,
    as a fresh row does (on 2026-12-07 a resumed row's passes ran on the host, 20x slower)."""
    on_gpu = copy.deepcopy(float_model).cuda()
    recipe = Recipe(method="minmax", bits=4, quant=QuantConfig(observer_sample_size=4096), learn=False)
    quantize_sam2(on_gpu, image_workload, recipe, tmp_path)
    again = quantize_sam2(on_gpu, image_workload, recipe, tmp_path).model
    assert {tensor.device.type for tensor in [*again.parameters(), *again.buffers()]} == {"cuda"}


def test_mask_kl_tables_equal_the_mask_kl_of_the_library_quantizing_that_layer_alone(
    float_model, image_workload
):
    """`error: mask` measures each layer's mask KL through hooks; the library's own path (quantize that layer's
    weights alone, every other layer kept in float, then calibration) must give the same KL."""
    from mqsam2.kl_importance import decoder_logits, mean_kl
    from mqsam2.quant.swap import DEFAULT_KEEP_FP, quantizable_layers

    measured = ("image_encoder.trunk.blocks.1.attn.qkv", "sam_mask_decoder.transformer.layers.0.mlp.layers.0")
    others = tuple(n for n in quantizable_layers(float_model) if n not in measured)
    quant = QuantConfig(keep_fp=DEFAULT_KEEP_FP + others)
    sample = [0, 0, 1]
    importance = measure_importance(
        float_model, image_workload, quant, measured_widths=[4], mask_samples=sample
    )
    assert set(importance) == set(measured)
    run = image_workload.samples(*sample)[0]
    reference = decoder_logits(float_model, lambda: run.run_full(float_model))
    for name in measured:
        keep = DEFAULT_KEEP_FP + tuple(n for n in quantizable_layers(float_model) if n != name)
        alone = quantize(copy.deepcopy(float_model), QuantConfig(bits=4, weight_only=True, keep_fp=keep))
        with calibration(alone):
            image_workload.run_full(alone)
        expected = mean_kl(reference, decoder_logits(alone, lambda a=alone: run.run_full(a)))
        assert expected > 0
        assert importance[name].weight_mask_kl["4"] == pytest.approx(expected, rel=1e-3)
        assert importance[name].act_mask_kl["4"] > 0
