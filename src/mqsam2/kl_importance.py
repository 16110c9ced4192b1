"""Mix-QSAM's layer importance and cross-layer synergy, measured on SAM2's output masks.

The model output Y, for SAM2: every mask-logit map the mask decoder produces while one calibration sample runs
as deployed (a clip tracked from its prompts, or an image segmented from its boxes and refined once), read as
independent per-pixel Bernoulli variables `sigmoid(z)`. For sample t and layer l:

    KL_t(l) = mean over the sample's mask-logit pixels of  KL( Bern(sigmoid(z_fp)) || Bern(sigmoid(z_l)) )

where z_l comes from the float model with layer l alone quantized at `bits` (its weight per output channel by
the weight observer, its input with the range the activation observer calibrates on float activations). The
direction is the paper's `D_KL(P(y | L_l, L_-l) || P(y | L_-l))`: the intact layer against the perturbed one.

    normalised importance (the paper's normalised CMI)   I_t(l) = KL_t(l) / sum_m KL_t(m)
    importance                                           Omega_l = mean_t I_t(l)
    synergy of adjacent layers l, m = l + 1              S_t(l) = 1 / (|I_t(l) - I_t(m)| + eps)
                                                         S_hat(l) = log(1 + mean_t S_t(l))

"Adjacent" is network order (the order of `named_modules`). eps is a tenth of the mean normalised importance
(0.1 / number of layers), so S_hat does not depend on the layer count except through the importances.
Samples whose quantized layers all leave the output exactly as it was carry no information and are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import fake_quantize, params_from_range
from mqsam2.quant.observers import Observer, make_observer
from mqsam2.quant.swap import QuantConfig
from mqsam2.sensitivity import layer_output, quantized_weight

OUTPUT_MODULE = "sam_mask_decoder"


def bernoulli_kl(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """Elementwise KL(Bern(sigmoid(a)) || Bern(sigmoid(b))), stable for large logits."""
    a, b = reference_logits.double(), logits.double()
    p = torch.sigmoid(a)
    return p * (F.logsigmoid(a) - F.logsigmoid(b)) + (1 - p) * (F.logsigmoid(-a) - F.logsigmoid(-b))


@dataclass(frozen=True)
class OutputSensitivity:
    """Per-sample KL of every reached layer, and the sizes the IQP budgets need, in network order."""

    names: tuple[str, ...]
    kl: Tensor  # [samples, layers], float64
    params: tuple[int, ...]  # weight elements per layer
    macs: tuple[int, ...]  # multiply-accumulates per layer over the samples' forward passes
    act_elements: tuple[int, ...]  # input elements per layer over the samples' forward passes

    def normalised(self) -> Tensor:
        """I_t(l): each informative sample's KL over its layers' sum (samples with no KL dropped)."""
        totals = self.kl.sum(dim=1, keepdim=True)
        informative = totals.squeeze(1) > 0
        if not informative.any():
            raise MQSAM2Error(
                "quantizing any single layer left every calibration output exactly unchanged: the KL "
                "importance is undefined (check that the calibration samples reach the mask decoder)"
            )
        return self.kl[informative] / totals[informative]

    def importance(self) -> Tensor:
        """Omega_l, summing to 1."""
        return self.normalised().mean(dim=0)

    def synergy(self, epsilon: float = 0.1) -> Tensor:
        """S_hat for each adjacent pair (l, l + 1): [layers - 1]; eps = epsilon / layers."""
        normalised = self.normalised()
        eps = epsilon / normalised.shape[1]
        mean = (1.0 / ((normalised[:, 1:] - normalised[:, :-1]).abs() + eps)).mean(dim=0)
        return torch.log1p(mean)


class _Hooks:
    """Forward (pre-)hooks removed on exit whatever happens."""

    def __init__(self):
        self.handles: list = []

    def __enter__(self) -> _Hooks:
        return self

    def add(self, handle) -> None:
        self.handles.append(handle)

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def decoder_logits(model: nn.Module, sample: Callable[[], None]) -> list[Tensor]:
    """The mask logits of every decoder call while `sample()` runs."""
    outputs: list[Tensor] = []
    with _Hooks() as hooks:
        hooks.add(
            model.get_submodule(OUTPUT_MODULE).register_forward_hook(
                lambda _m, _a, out: outputs.append(out[0].detach().clone())
            )
        )
        sample()
    return outputs


def mean_kl(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    if len(reference) != len(outputs):
        raise MQSAM2Error(
            f"the quantized pass made {len(outputs)} decoder calls where the float one made {len(reference)}"
        )
    total = sum(bernoulli_kl(r, o).sum() for r, o in zip(reference, outputs, strict=True))
    return float(total) / max(sum(r.numel() for r in reference), 1)


@torch.no_grad()
def measure_output_kl(
    model: nn.Module,
    samples: Sequence[Callable[[], None]],
    layers: Mapping[str, nn.Module],
    bits: int,
    config: QuantConfig,
) -> OutputSensitivity:
    """KL_t(l) for every layer of `layers` (float Linear/Conv2d of `model`) that the samples reach.

    Each sample is a callable that runs one calibration sample through `model`; it is called once in float
    (observing ranges and sizes, recording the reference masks) and once per reached layer.
    """
    observers: dict[str, Observer] = {}
    macs: dict[str, int] = {}
    elements: dict[str, int] = {}

    def observe(name: str, layer: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0]
        if name not in observers:
            observers[name] = make_observer(
                config.act_observer,
                percentile=config.percentile,
                p=config.mse_p,
                sample_size=config.observer_sample_size,
            )
            macs[name] = elements[name] = 0
        observers[name].update(x)
        macs[name] += output.numel() * layer.weight[0].numel()
        elements[name] += x.numel()

    with _Hooks() as hooks:
        for name, layer in layers.items():
            hooks.add(layer.register_forward_hook(lambda m, a, o, name=name: observe(name, m, a, o)))
        references = [decoder_logits(model, sample) for sample in samples]
    names = tuple(name for name in layers if name in observers)
    if not names:
        raise MQSAM2Error("the calibration samples reached none of the layers to measure")
    kl = torch.zeros(len(samples), len(names), dtype=torch.float64)
    for column, name in enumerate(names):
        layer = layers[name]
        weight = quantized_weight(layer, bits, config)
        scale, zero_point = params_from_range(*observers[name].compute_range(bits), bits)

        def quantized(
            _m: nn.Module, args: tuple, _out: Tensor, layer=layer, weight=weight, qparams=(scale, zero_point)
        ) -> Tensor:
            return layer_output(layer, fake_quantize(args[0], *qparams, bits), weight)

        with _Hooks() as hooks:
            hooks.add(layer.register_forward_hook(quantized))
            for row, sample in enumerate(samples):
                kl[row, column] = mean_kl(references[row], decoder_logits(model, sample))
    return OutputSensitivity(
        names=names,
        kl=kl,
        params=tuple(layers[name].weight.numel() for name in names),
        macs=tuple(macs[name] for name in names),
        act_elements=tuple(elements[name] for name in names),
    )
