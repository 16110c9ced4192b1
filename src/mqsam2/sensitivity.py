"""The measured error model of Eq. 6 (`allocation.error: measured`): for every layer and candidate width, the
layer's relative output error `||f(Q_b(x); W) - f(x; W)||^2 / ||f(x; W)||^2` with only its input quantized, and
the same with only its weight quantized, summed over the calibration set.

The paper's `E(b) = 2^-b` says every layer loses the same fraction per bit; a layer whose inputs carry outliers
loses far more at 4 bits than one with a tight distribution, and the measured table sees it. Two passes over the
calibration forward passes: the first observes each layer's input range (the method's own observer, so the
error is the one calibration will give), the second streams the errors through forward hooks. Nothing but
per-layer sums is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import fake_quantize, params_from_range
from mqsam2.quant.observers import Observer, make_observer
from mqsam2.quant.swap import QuantConfig


def layer_output(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's forward with another weight (Linear or Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def quantized_weight(layer: nn.Module, bits: int, config: QuantConfig) -> Tensor:
    """The layer's weight fake-quantized per output channel with the configured weight observer."""
    observer = make_observer(
        config.weight_observer, axis=0, percentile=config.percentile, p=config.mse_p, sample_size=None
    )
    observer.update(layer.weight)
    scale, zero_point = params_from_range(*observer.compute_range(bits), bits)
    return fake_quantize(layer.weight.detach().float(), scale, zero_point, bits, axis=0).to(
        layer.weight.dtype
    )


class _Sums:
    """float64 running sums of the squared output, and of the squared errors per (kind, width)."""

    def __init__(self, candidates: Sequence[int], device: torch.device):
        self.energy = torch.zeros((), dtype=torch.float64, device=device)
        self.errors = {
            kind: torch.zeros(len(candidates), dtype=torch.float64, device=device) for kind in ("w", "a")
        }


@dataclass
class WidthQuantizers:
    """One layer's fake quantizers at each candidate width, as calibration would set them: its weight per
    output channel, and its input's (scale, zero point) from the activation observer (None for `dynamic`,
    which quantizes each input with its own min-max range)."""

    candidates: list[int]
    weights: list[Tensor]
    act_params: list[tuple[Tensor, Tensor]] | None

    def quantized_input(self, x: Tensor, k: int) -> Tensor:
        bits = self.candidates[k]
        if self.act_params is None:
            return fake_quantize(x, *params_from_range(x.amin(), x.amax(), bits), bits)
        return fake_quantize(x, *self.act_params[k], bits)


def calibrate_quantizers(
    layers: Mapping[str, nn.Module],
    run: Callable[[], None],
    candidates: Sequence[int],
    config: QuantConfig,
) -> dict[str, WidthQuantizers]:
    """{layer: its quantizers at every candidate width} for the layers `run()` reaches (one pass)."""
    candidates = sorted(int(b) for b in candidates)
    dynamic = config.act_observer == "dynamic"
    observers: dict[str, Observer] = {}

    def observe(name: str, _layer: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["input"]
        if name not in observers:
            observers[name] = make_observer(
                "minmax" if dynamic else config.act_observer,
                percentile=config.percentile,
                p=config.mse_p,
                sample_size=config.observer_sample_size,
            )
        observers[name].update(x)

    with _hooked(layers, observe, pre=True):
        run()
    if not observers:
        raise MQSAM2Error("the calibration passes reached none of the layers to measure")
    return {
        name: WidthQuantizers(
            candidates,
            [quantized_weight(layers[name], b, config) for b in candidates],
            None if dynamic else [params_from_range(*observer.compute_range(b), b) for b in candidates],
        )
        for name, observer in observers.items()
    }


def measure_layer_errors(
    layers: Mapping[str, nn.Module],
    run: Callable[[], None],
    candidates: Sequence[int],
    config: QuantConfig,
    quantizers: Mapping[str, WidthQuantizers] | None = None,
) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """{layer: (weight errors, activation errors)}, each `{str(bits): relative output error}`.

    `run()` pushes the calibration set through the (float) model that owns `layers`; it is called twice (once
    when `quantizers` from `calibrate_quantizers` at these candidates are given). Layers that `run()` never
    reaches are left out (they stay in floating point).
    """
    candidates = sorted(int(b) for b in candidates)
    if quantizers is None:
        quantizers = calibrate_quantizers(layers, run, candidates, config)
    sums = {name: _Sums(candidates, layers[name].weight.device) for name in quantizers}

    def accumulate(name: str, layer: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if name not in sums:
            return
        x = args[0] if args else kwargs["input"]
        reference = output.double()
        entry, quantizer = sums[name], quantizers[name]
        entry.energy += reference.square().sum()
        for k in range(len(candidates)):
            for kind, out in (
                ("w", layer_output(layer, x, quantizer.weights[k])),
                ("a", layer_output(layer, quantizer.quantized_input(x, k), layer.weight)),
            ):
                entry.errors[kind][k] += (out.double() - reference).square().sum()

    with _hooked(layers, accumulate, pre=False):
        run()
    result = {}
    for name, entry in sums.items():
        energy = max(entry.energy.item(), torch.finfo(torch.float64).tiny)
        result[name] = tuple(
            {str(b): entry.errors[kind][k].item() / energy for k, b in enumerate(candidates)}
            for kind in ("w", "a")
        )
    return result


class _hooked:
    """Forward (pre-)hooks on every layer, removed on exit whatever happens."""

    def __init__(self, layers: Mapping[str, nn.Module], hook: Callable, pre: bool):
        self.layers, self.hook, self.pre = layers, hook, pre
        self.handles: list = []

    def __enter__(self) -> None:
        for name, layer in self.layers.items():
            register = layer.register_forward_pre_hook if self.pre else layer.register_forward_hook
            self.handles.append(register(partial(self.hook, name), with_kwargs=True))

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
