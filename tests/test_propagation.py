"""Downstream gains by noise injection, against the second-order expansion of the Bernoulli KL."""

import pytest
import torch
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.propagation import measure_gains


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
