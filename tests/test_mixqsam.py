"""Mix-QSAM: the IQP's optimum against brute force, the program against its documented formula, the KL
importance against a direct two-pass computation with the library's own quantizer."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, kl_divergence

from mqsam2.allocation import AllocationError
from mqsam2.api import Recipe, allocate_bits
from mqsam2.data import calibration_set, ensure_synth
from mqsam2.errors import MQSAM2Error
from mqsam2.iqp import iqp_objective, solve_iqp
from mqsam2.kl_importance import OutputSensitivity, bernoulli_kl, measure_output_kl
from mqsam2.methods.mixqsam import MixQSAMAllocator, mixqsam_program
from mqsam2.quant import DEFAULT_KEEP_FP, QuantConfig, calibration, quantizable_layers, quantize
from mqsam2.workload import Workload

DECODER_LAYER = "sam_mask_decoder.transformer.layers.0.mlp.layers.0"
ENCODER_LAYER = "image_encoder.trunk.blocks.11.mlp.layers.1"
HEAD_LAYER = "sam_mask_decoder.iou_prediction_head.layers.0"


def _brute_force(unary, pair, budgets):
    """(least objective, a choice reaching it) over every feasible choice; None when none fits."""
    best = None
    for choice in itertools.product(range(len(unary[0])), repeat=len(unary)):
        if all(sum(w[i][k] for i, k in enumerate(choice)) <= limit for w, limit in budgets):
            value = iqp_objective(unary, pair, choice)
            if best is None or value < best[0]:
                best = (value, choice)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_iqp_optimum_matches_brute_force(seed):
    """Random instances of 5 layers x 3 options, pair costs of either sign (the linearisation must hold for
    both), integer budgets between the cheapest and the dearest choice."""
    g = torch.Generator().manual_seed(seed)
    layers, options = 5, 3
    unary = torch.rand(layers, options, generator=g).tolist()
    pair = (torch.rand(layers - 1, options, options, generator=g) - (0.3 if seed % 2 else 0.0)).tolist()
    budgets = []
    for _ in range(2):
        weights = torch.randint(1, 20, (layers, options), generator=g)
        low, high = weights.min(1).values.sum().item(), weights.max(1).values.sum().item()
        limit = low + int((high - low) * torch.rand(1, generator=g).item())
        budgets.append((weights.tolist(), limit))
    expected = _brute_force(unary, pair, budgets)
    if expected is None:
        with pytest.raises(AllocationError, match="no choice"):
            solve_iqp(unary, pair, budgets)
        return
    choice = solve_iqp(unary, pair, budgets)
    assert all(sum(w[i][k] for i, k in enumerate(choice)) <= limit for w, limit in budgets)
    assert iqp_objective(unary, pair, choice) == pytest.approx(expected[0], abs=1e-9)


def _sensitivity(kl, params, macs):
    names = tuple(f"layer{i}" for i in range(len(params)))
    return OutputSensitivity(
        names, torch.tensor(kl, dtype=torch.float64), tuple(params), tuple(macs), tuple(params)
    )


def test_importance_and_synergy_follow_the_paper_formulas():
    kl = [[0.2, 0.6, 0.2, 0.0], [1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # the last sample is dropped
    sensitivity = _sensitivity(kl, [1, 1, 1, 1], [1, 1, 1, 1])
    normalised = [[0.2, 0.6, 0.2, 0.0], [0.25, 0.25, 0.5, 0.0]]
    omega = [(a + b) / 2 for a, b in zip(*normalised, strict=True)]
    assert sensitivity.importance().tolist() == pytest.approx(omega)
    eps = 0.1 / 4
    synergy = [
        math.log1p(sum(1 / (abs(row[i] - row[i + 1]) + eps) for row in normalised) / 2) for i in range(3)
    ]
    assert sensitivity.synergy().tolist() == pytest.approx(synergy)


def test_kl_importance_is_undefined_when_no_layer_changes_the_output():
    with pytest.raises(MQSAM2Error, match="undefined"):
        _sensitivity([[0.0, 0.0]], [1, 1], [1, 1]).importance()


@pytest.mark.parametrize("target", [4, 4.5])
def test_mixqsam_program_minimises_the_documented_objective(target):
    """The allocation from `mixqsam_program` + `solve_iqp` against brute force over widths of the module
    docstring's formula, written out here: predicted KL + smoothness, size and BOPs budgets of uniform B."""
    g = torch.Generator().manual_seed(0)
    kl = (torch.rand(3, 6, generator=g) ** 6).tolist()  # heavy-tailed, as output KL across layers is
    params = [100, 300, 50, 300, 120, 80]
    macs = [4000, 1000, 9000, 3000, 500, 2500]
    sensitivity = _sensitivity(kl, params, macs)
    candidates = [3, 4, 5]
    lam = 0.05
    unary, pair, budgets = mixqsam_program(sensitivity, candidates, target, synergy_weight=lam)
    choice = solve_iqp(unary, pair, budgets)
    bits = [candidates[k] for k in choice]

    omega = sensitivity.importance().tolist()
    synergy = sensitivity.synergy().tolist()
    weights = [s / sum(synergy) for s in synergy]

    def objective(widths):
        predicted = sum(o * 4.0 ** -(b - 3) for o, b in zip(omega, widths, strict=True))
        smooth = sum(w * (widths[i] - widths[i + 1]) ** 2 for i, w in enumerate(weights))
        return predicted + lam * smooth

    def feasible(widths):
        size = sum(p * b for p, b in zip(params, widths, strict=True)) <= target * sum(params)
        scaled = [max(1, round(m * 10**6 / max(macs))) for m in macs]
        bops = sum(m * b * b for m, b in zip(scaled, widths, strict=True)) <= target**2 * sum(scaled)
        return size and bops

    best = min(objective(w) for w in itertools.product(candidates, repeat=len(params)) if feasible(w))
    assert feasible(bits)
    assert objective(bits) == pytest.approx(best, rel=1e-9)
    assert len(set(bits)) > 1  # mixed: the brute force optimum is not uniform here


def test_bernoulli_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = 6 * torch.randn(1000, generator=g), 6 * torch.randn(1000, generator=g)
    expected = kl_divergence(Bernoulli(logits=a.double()), Bernoulli(logits=b.double()))
    assert torch.allclose(bernoulli_kl(a, b), expected, rtol=1e-9, atol=1e-12)
    assert bernoulli_kl(a, a).abs().max() < 1e-12


@pytest.fixture(scope="module")
def image_workload(tmp_path_factory):
    shards = ensure_synth(tmp_path_factory.mktemp("synth"), videos=1, frames=4, size=256, images=2)
    data = calibration_set(shards.videos, shards.images, 1, 3, 2, image_size=256, seed=0)
    return Workload([], data.images, max_objects=1)


def _logits(model, workload):
    logits = []
    handle = model.sam_mask_decoder.register_forward_hook(lambda _m, _a, out: logits.append(out[0].clone()))
    try:
        workload.run_full(model)
    finally:
        handle.remove()
    return logits


def test_kl_importance_matches_a_direct_two_pass_computation(tiny_video_model, image_workload):
    """For each layer and image: the float model's mask logits, then a copy with only that layer quantized by
    the library (quantize + calibration with every other layer kept float), and the mean Bernoulli KL of
    torch.distributions between them. float64 sums over ~10^5 pixels: agreement to 1e-6 relative."""
    model = tiny_video_model
    config = QuantConfig(bits=3, weight_observer="mse", act_observer="mse", observer_sample_size=4096)
    layers = {name: model.get_submodule(name) for name in (ENCODER_LAYER, DECODER_LAYER)}
    samples = [dataclasses.replace(image_workload, images=image_workload.images[:1])]
    measured = measure_output_kl(model, [lambda s=s: s.run_full(model) for s in samples], layers, 3, config)
    assert measured.names == (ENCODER_LAYER, DECODER_LAYER)
    every = tuple(quantizable_layers(model))
    for column, name in enumerate(measured.names):
        single = dataclasses.replace(config, keep_fp=(*DEFAULT_KEEP_FP, *(n for n in every if n != name)))
        quantized = quantize(copy.deepcopy(model), single)
        with calibration(quantized):
            for sample in samples:
                sample.run_full(quantized)
        for row, sample in enumerate(samples):
            pairs = zip(_logits(model, sample), _logits(quantized, sample), strict=True)
            kl = [kl_divergence(Bernoulli(logits=f.double()), Bernoulli(logits=q.double())) for f, q in pairs]
            expected = sum(k.sum() for k in kl).item() / sum(k.numel() for k in kl)
            assert expected > 0
            assert measured.kl[row, column].item() == pytest.approx(expected, rel=1e-6)


def test_mixqsam_allocates_within_the_uniform_budgets(tiny_video_model, image_workload):
    """Through the registry's allocator, on three layers the images reach: widths from {3, 4, 5}, the
    parameter-weighted average at most 4; Eq. 2-4 allocation refuses the method."""
    model = tiny_video_model
    chosen = (ENCODER_LAYER, DECODER_LAYER, HEAD_LAYER)
    keep = (*DEFAULT_KEEP_FP, *(n for n in quantizable_layers(model) if n not in chosen))
    recipe = Recipe(method="mixqsam", bits=4, quant=QuantConfig(keep_fp=keep, observer_sample_size=4096))
    allocation = MixQSAMAllocator(clips=0, images=1)(model, image_workload, recipe)
    assert set(allocation.names) == set(chosen)
    assert set(allocation.bits) <= {3, 4, 5}
    assert allocation.average_bits <= 4
    assert allocation.plan == dict(zip(allocation.names, allocation.bits, strict=True))
    with pytest.raises(MQSAM2Error, match="allocator"):
        allocate_bits({}, recipe)
