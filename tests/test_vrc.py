"""Q-SAM2's Variance-Reduced Calibration against a numerical least-squares solve, and as a model hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.vrc import InputMoments, encoder_linears, recalibrated, variance_reduced_calibration


def _inputs(n: int = 300, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows with a non-zero mean and variances spread over four decades (some directions nearly empty)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, d, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (torch.randn(n, d, generator=generator, dtype=torch.float64) * scales) @ basis.T + 0.5


@pytest.mark.parametrize("damping", [1e-3, 1e-1, 1.0])
def test_closed_form_equals_a_least_squares_solve(damping):
    """min over (W', b') of ||X W'^T + 1 b'^T - Y||^2 + n lambda ||W'||^2 is the ordinary least-squares problem
    [X 1; sqrt(n lambda) I 0] [W'^T; b'^T] = [Y; 0], solved here by torch.linalg.lstsq. The moments are
    streamed in uneven chunks. Float64: agreement to 1e-9 (relative) is rounding only."""
    x = _inputs()
    n, d = x.shape
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(5, d, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    moments = InputMoments()
    for chunk in torch.split(x, [7, 93, 200]):
        moments.update(chunk.float())  # layers see float32 inputs
    mean, covariance = moments.mean_and_covariance()
    new_w, new_b = recalibrated(weight, bias, mean, covariance, damping)

    xf = x.float().double()
    centred = xf - xf.mean(0)
    lam = damping * centred.pow(2).mean(0).sum() / d  # damping x mean input variance
    design = torch.cat(
        [
            torch.cat([xf, torch.ones(n, 1, dtype=torch.float64)], dim=1),
            torch.cat([(n * lam).sqrt() * torch.eye(d, dtype=torch.float64), torch.zeros(d, 1)], dim=1),
        ]
    )
    target = torch.cat([xf @ weight.T + bias, torch.zeros(d, 5, dtype=torch.float64)])
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
    torch.testing.assert_close(new_w, solution[:d].T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new_b, solution[d], rtol=1e-9, atol=1e-9)


def test_weights_shrink_along_empty_input_directions_and_the_output_mean_stays():
    x = _inputs(d=6).float()
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        before = layer(x)
    report = variance_reduced_calibration({"layer": layer}, lambda: layer(x), damping=0.05)["layer"]
    with torch.no_grad():
        after = layer(x)
    assert report.std_ratio < 1
    torch.testing.assert_close(after.mean(0), before.mean(0), rtol=1e-4, atol=1e-4)
    relative = (after - before).norm() / before.norm()
    assert abs(float(relative) - report.output_error) < 1e-3  # the report measures the real output change
    with pytest.raises(MQSAM2Error, match="damping must be positive"):
        recalibrated(layer.weight, layer.bias, x.mean(0), torch.eye(6), 0.0)


def test_hook_selects_the_image_encoders_quantized_linears_and_changes_nothing_else(
    tiny_video_model, square_clip
):
    """The selection covers every trunk Linear (and nothing outside the image encoder); VRC on a few of them
    (all would cost minutes of float64 solves on a CPU) changes those layers only."""
    frames, _ = square_clip
    layers = encoder_linears(tiny_video_model)
    trunk = tiny_video_model.image_encoder.trunk.blocks
    assert len(layers) == sum(isinstance(m, nn.Linear) for m in trunk.modules())
    assert all(name.startswith("image_encoder.trunk.blocks.") for name in layers)
    chosen = dict(list(layers.items())[:4])
    before = {n: p.clone() for n, p in tiny_video_model.named_parameters()}
    report = variance_reduced_calibration(chosen, lambda: tiny_video_model.image_encoder.trunk(frames[:1]))
    assert set(report) == set(chosen) and all(0 < r.std_ratio < 1 for r in report.values())
    changed = {n for n, p in tiny_video_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{name}.{kind}" for name in chosen for kind in ("weight", "bias")}
