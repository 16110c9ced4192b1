"""Downstream gains by noise injection, against the second-order expansion of the Bernoulli KL; the mask KL of
a layer alone quantized, against Eq. 1 written out."""

import pytest
import torch
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.kl_importance import bernoulli_kl
from mqsam2.propagation import measure_gains, measure_mask_kl
from mqsam2.quant.swap import QuantConfig
from mqsam2.sensitivity import calibrate_quantizers


class _Decoder(nn.Module):
    """Stands in for SAM2's mask decoder: its first output is the mask logits."""

    def forward(self, x):
        return (x,)


class _Toy(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.first = nn.Linear(width, width, bias=False)
        self.unused = nn.Linear(width, width)
        self.sam_mask_decoder = _Decoder()
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(width))

    def forward(self, x):
        return self.sam_mask_decoder(self.first(x))


def test_gain_is_the_fisher_information_of_the_mask_logits_per_unit_noise_power():
    """Noise of relative power s on logits z gives KL ~ 1/2 p(1-p) (s rms(z)^2) per pixel, so the gain is
    mean(1/2 p(1-p)) * rms(z)^2, whatever s is (small); an unreached layer has no gain."""
    torch.manual_seed(0)
    model = _Toy(256)
    x = 2.0 * torch.randn(512, 256)
    p = torch.sigmoid(x.double())
    expected = (0.5 * p * (1 - p)).mean().item() * x.double().square().mean().item()
    layers = {"first": model.first, "unused": model.unused}
    for power in (1e-4, 1e-3):
        gains = measure_gains(model, [lambda: model(x)], layers, noise_power=power)
        assert set(gains) == {"first"}
        assert gains["first"] == pytest.approx(expected, rel=0.03)


def test_gains_need_positive_noise_and_a_reached_layer():
    model = _Toy(4)
    with pytest.raises(MQSAM2Error, match="noise_power must be positive"):
        measure_gains(model, [lambda: model(torch.ones(1, 4))], {"first": model.first}, noise_power=0)
    with pytest.raises(MQSAM2Error, match="reached none"):
        measure_gains(model, [lambda: model(torch.ones(1, 4))], {"unused": model.unused})


def _minmax_fake_quant(x, low, high, bits, dim=None):
    """Eq. 1 written out: asymmetric, the range nudged to hold 0, per row of x when dim is given."""
    levels = 2**bits - 1
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = (high - low).clamp(min=1e-8) / levels
    zero = torch.round(-low / scale)
    if dim is not None:
        scale, zero = scale.unsqueeze(dim), zero.unsqueeze(dim)
    return (torch.clamp(torch.round(x / scale + zero), 0, levels) - zero) * scale


def test_mask_kl_is_the_bernoulli_kl_of_the_layer_alone_quantized():
    """Against a hand-written Eq. 1 (per-channel min-max weights, per-tensor min-max input) and the closed-form
    Bernoulli KL; a layer the sample never reaches is not measured."""
    torch.manual_seed(0)
    model = _Toy(16)
    with torch.no_grad():
        model.first.weight.copy_(torch.randn(16, 16))
    x = torch.randn(64, 16)
    layers = {"first": model.first, "unused": model.unused}
    config = QuantConfig(bits=4)
    quantizers = calibrate_quantizers(layers, lambda: model(x), [2, 3, 4], config)
    assert set(quantizers) == {"first"}
    tables = measure_mask_kl(model, [lambda: model(x)], layers, quantizers)
    reference = x @ model.first.weight.T
    for bits in (2, 3, 4):
        w = model.first.weight.detach()
        w_q = _minmax_fake_quant(w, w.amin(1), w.amax(1), bits, dim=1)
        x_q = _minmax_fake_quant(x, x.min(), x.max(), bits)
        for side, logits in enumerate((x @ w_q.T, x_q @ w.T)):
            expected = bernoulli_kl(reference, logits).mean().item()
            assert tables["first"][side][str(bits)] == pytest.approx(expected, rel=1e-4)
    assert tables["first"][1]["2"] > tables["first"][1]["4"]
