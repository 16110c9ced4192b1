"""Q-SAM2's Variance-Reduced Calibration (VRC): a closed-form recalibration of the image encoder's Linear
weights before quantization, so the weight distribution is narrower and easier to quantize.

For one layer y = W x + b with calibration inputs X (n rows), VRC takes

    (W', b') = argmin  1/n ||X W'^T + 1 b'^T - (X W^T + 1 b^T)||_F^2  +  lambda ||W'||_F^2

(the output error over the calibration batch plus the weight's Frobenius norm; the bias is free). With mu the
input mean and C the input covariance, the solution is W' = W C (C + lambda I)^-1 and b' = b + (W - W') mu:
the output mean is kept exactly, and W shrinks along input directions that carry little energy, where large
weights cost nothing on the data but stretch the quantization grid. lambda = damping * trace(C) / d, so the
damping is relative to the mean input variance. As damping -> 0 this is the minimum-norm least-squares
solution through the pseudoinverse of the centred X (the paper's formulation); a positive damping is its
Tikhonov form, which also shrinks directions that are weak but not exactly absent in a large batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.swap import DEFAULT_KEEP_FP, quantizable_layers

log = logging.getLogger(__name__)


class InputMoments:
    """Running count, sum and Gram matrix of a layer's inputs (rows = last dimension), accumulated in float64."""

    def __init__(self):
        self.count = 0
        self.total: Tensor | None = None
        self.gram: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        # float64 throughout: the covariance is E[x x^T] - mu mu^T, which cancels badly in float32 for weak
        # directions of inputs with a large mean, exactly the directions VRC acts on.
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        if self.total is None:
            self.total = rows.new_zeros(rows.shape[1])
            self.gram = rows.new_zeros(rows.shape[1], rows.shape[1])
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.gram += rows.T @ rows

    def mean_and_covariance(self) -> tuple[Tensor, Tensor]:
        if not self.count:
            raise MQSAM2Error("VRC saw no inputs for a layer: run calibration data through it")
        mean = self.total / self.count
        return mean, self.gram / self.count - torch.outer(mean, mean)


def recalibrated(
    weight: Tensor, bias: Tensor | None, mean: Tensor, covariance: Tensor, damping: float
) -> tuple[Tensor, Tensor]:
    """(W', b') minimising the output error over the inputs described by (mean, covariance) plus
    lambda ||W'||_F^2, lambda = damping * mean input variance; float64 math, results in the weight's dtype."""
    if damping <= 0:
        raise MQSAM2Error(f"VRC damping must be positive, got {damping}")
    w = weight.double()
    c = covariance.double().to(w.device)
    mu = mean.double().to(w.device)
    ridge = damping * torch.diagonal(c).mean().clamp_min(torch.finfo(torch.float64).tiny)
    # W C (C + lambda I)^-1 = W - lambda W (C + lambda I)^-1, and C + lambda I is symmetric positive definite
    factor = torch.linalg.cholesky(c + ridge * torch.eye(len(c), dtype=c.dtype, device=c.device))
    new_w = w - ridge * torch.cholesky_solve(w.T, factor).T
    b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if bias is None else bias.double()
    new_b = b + (w - new_w) @ mu
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


@dataclass(frozen=True)
class VRCReport:
    """Per layer: the weight's standard deviation after / before, and the relative output error on the
    calibration inputs, ||X (W - W')^T||_F / ||X W^T + b||_F."""

    std_ratio: float
    output_error: float


@torch.no_grad()
def variance_reduced_calibration(
    layers: Mapping[str, nn.Linear], run: Callable[[], None], damping: float = 0.01
) -> dict[str, VRCReport]:
    """Collect every layer's input moments over `run()` (the calibration passes), then replace its weight and
    bias by their VRC recalibration in place."""
    moments = {name: InputMoments() for name in layers}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, stats=moments[name]: stats.update(args[0]))
        for name, layer in layers.items()
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    report = {}
    for name, layer in layers.items():
        mean, covariance = moments[name].mean_and_covariance()
        new_w, new_b = recalibrated(layer.weight, layer.bias, mean, covariance, damping)
        report[name] = _report(layer.weight, layer.bias, new_w, mean, covariance)
        layer.weight.copy_(new_w)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b, requires_grad=False)
        else:
            layer.bias.copy_(new_b)
    if report:
        log.info(
            "VRC on %d Linear layers: weight std x%.3f, relative output error %.4f (means)",
            len(report),
            sum(r.std_ratio for r in report.values()) / len(report),
            sum(r.output_error for r in report.values()) / len(report),
        )
    return report


def _report(
    weight: Tensor, bias: Tensor | None, new_w: Tensor, mean: Tensor, covariance: Tensor
) -> VRCReport:
    """E||(W - W') (x - mu)||^2 = tr(D C D^T) against E||W x + b||^2 = tr(W C W^T) + ||W mu + b||^2."""
    w, delta = weight.double(), weight.double() - new_w.double()
    c, mu = covariance.to(w.device), mean.to(w.device)
    out_mean = w @ mu + (0 if bias is None else bias.double())
    signal = ((w @ c) * w).sum() + out_mean.pow(2).sum()
    error = ((delta @ c) * delta).sum().clamp_min(0)
    return VRCReport(float(new_w.float().std() / weight.float().std()), float((error / signal).sqrt()))


def encoder_linears(model: nn.Module, keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP) -> dict[str, nn.Linear]:
    """The image encoder's Linear layers that quantization will swap (the paper calibrates exactly these)."""
    return {
        name: layer
        for name, layer in quantizable_layers(model, keep_fp).items()
        if name.startswith("image_encoder.") and isinstance(layer, nn.Linear)
    }


def vrc_before_quantize(model: nn.Module, workload) -> None:
    """The `before_quantize` hook of Q-SAM2: VRC on the image encoder's Linear layers over every calibration
    frame and image (encoder passes only)."""
    variance_reduced_calibration(encoder_linears(model), lambda: workload.run_encoder(model))
