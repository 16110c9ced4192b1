"""Q-SAM2's Learnable Statistical Clipping: the clipping gradient against finite differences, the momentum
statistics against their recurrence, the start and end states against the affine quantizer, and the whole
Q-SAM2 recipe at W2A4 through the library front door."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mqsam2.api import Recipe, quantize_sam2
from mqsam2.config import ReconstructionConfig
from mqsam2.methods.qsam2 import QSAM2
from mqsam2.models import build_sam2
from mqsam2.quant.affine import qmax
from mqsam2.quant.lsc import StatisticalClipQuantizer, calibrated_range
from mqsam2.quant.modules import QuantLayerMixin
from mqsam2.quant.quantizer import ActQuantizer, WeightQuantizer
from mqsam2.quant.vrc import vrc_before_quantize
from mqsam2.workload import Workload

from .eval_data import EVAL_IMAGE_SIZE, make_clip


def _clip_quantizer(axis, bits=2, seed=0):
    """Statistics from one tensor, factors 1.0 and 1.2 (so a good share of a heavy-tailed input is clipped)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 40, generator=generator) ** 3 + 0.2
    stats_x = x if axis is not None else x.flatten()
    mean = stats_x.mean(dim=-1)
    std = stats_x.std(dim=-1, correction=0)
    lo, hi = mean - 1.0 * std, mean + 1.2 * std
    return StatisticalClipQuantizer(bits, lo, hi, mean, std, axis, momentum=0.9), x


@pytest.mark.parametrize("axis", [0, None], ids=["per-channel", "per-tensor"])
def test_clipping_gradient_matches_finite_differences(axis):
    """On the clipped values the quantizer outputs a grid end, (2^b - 1 - z) * s or -z * s, which is smooth in
    the factors while the integer zero-point z stays put: autograd must match central differences there. (On
    values inside the range the rounding's straight-through gradient is a deliberate estimate, not a
    derivative, so they are left out.) Float32 and a linear function of the factors: 1e-3 relative."""
    quantizer, x = _clip_quantizer(axis)
    lo, hi = (b.detach() for b in quantizer.bounds())
    lo_b, hi_b = (b.view(-1, 1) if axis == 0 else b for b in (lo, hi))
    clipped = (x < lo_b) | (x > hi_b)
    assert 0.05 < clipped.float().mean() < 0.5
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        return (weights * quantizer(x) * clipped).sum()

    loss().backward()
    step = 1e-2
    for factor in (quantizer.lo_factor, quantizer.hi_factor):
        numeric = torch.zeros_like(factor)
        for i in range(factor.numel()):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    factor.view(-1)[i] += sign * step
                    values.append(loss())
                    factor.view(-1)[i] -= sign * step
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * step)
        torch.testing.assert_close(factor.grad, numeric, rtol=1e-3, atol=1e-4)
        assert factor.grad.abs().min() > 0


def test_running_statistics_follow_the_momentum_recurrence():
    quantizer, _ = _clip_quantizer(axis=0)
    quantizer.tracking = True
    mean, std = quantizer.running_mean.clone(), quantizer.running_std.clone()
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(6, 40, generator=generator) * 2 + 1
        quantizer(x)
        mean = 0.9 * mean + 0.1 * x.mean(dim=1)
        std = 0.9 * std + 0.1 * x.var(dim=1, correction=0).sqrt()
    torch.testing.assert_close(quantizer.running_mean, mean)
    torch.testing.assert_close(quantizer.running_std, std)
    with torch.no_grad():  # evaluation never moves the statistics
        quantizer(torch.randn(6, 40))
    torch.testing.assert_close(quantizer.running_mean, mean)


@pytest.mark.parametrize("bits", [2, 4])
def test_clipping_starts_at_the_calibrated_range_and_ends_as_an_affine_quantizer(bits):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 16, generator=generator)
    affine = WeightQuantizer(bits, 8)
    affine.set_range(weight.amin(dim=1), weight.amax(dim=1))
    lo, hi = calibrated_range(affine)
    clip = StatisticalClipQuantizer.replacing(affine, weight.mean(1), weight.std(1, correction=0), 0.9)
    for got, want in zip(clip.bounds(), (lo, hi), strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        clip.hi_factor.mul_(0.7)  # as if learned: clip the top
        learned = clip(weight)
    plain = clip.to_affine(affine)
    assert torch.equal(plain(weight), learned)
    codes = plain.codes(weight)
    assert int(codes.max()) <= qmax(bits) and all(len(row.unique()) <= 2**bits for row in codes)


def test_qsam2_recipe_at_w2a4_runs_and_leaves_plain_2_bit_quantizers(tmp_path):
    """Calibration and LSC on two units of a random-init tiny SAM2 at 64 px through the library front door: the
    result holds ordinary affine quantizers, weights at 2 bits and inputs at 4, and the units' output errors
    fall. Two parts of the registered method are swapped for cheap ones, each tested elsewhere: VRC (its float64
    solves over the whole encoder) and the OMSE observers (their weight search), which cost minutes on a CPU."""
    assert QSAM2.before_quantize is vrc_before_quantize and QSAM2.weight_observer == "mse"
    float_model = build_sam2("t", image_size=EVAL_IMAGE_SIZE)
    workload = Workload([make_clip(num_frames=4, num_objects=1)], [], max_objects=1)
    units = ["memory_attention.layers.0", "obj_ptr_proj"]
    recipe = Recipe(
        method=dataclasses.replace(
            QSAM2, before_quantize=None, weight_observer="minmax", act_observer="minmax"
        ),
        bits=2,
        act_bits=4,
        reconstruction=ReconstructionConfig(
            iters=30, batch_size=2, checkpoint_every=30, accelerator="cpu", units=units
        ),
    )
    model = quantize_sam2(float_model, workload, recipe, workdir=tmp_path).model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    assert layers and all(m.bits == 2 and m.act_bits in (4, None) for m in layers.values())
    assert not any(isinstance(m, StatisticalClipQuantizer) for m in model.modules())
    assert all(isinstance(m.input_quantizer, ActQuantizer | None) for m in layers.values())
    records = [json.loads(line) for line in (tmp_path / "units.jsonl").read_text().splitlines()]
    assert [r["unit"] for r in records] == units
    assert all(r["error_after"] < r["error_before"] for r in records), records
