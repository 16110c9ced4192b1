"""How much of a layer's output error reaches SAM2's masks: the downstream gain behind
`allocation.error: propagated`.

The measured table (`mqsam2.sensitivity`) gives each layer's relative output error e_l(b) at each width. Summed
over layers as it stands, an error in the first Hiera block, which every later module reads, counts the same as
one in the last decoder projection, and the allocator spends narrow widths where they hurt most. The gain g_l
is measured once per layer by noise injection: the layer's output is perturbed by Gaussian noise of relative
power sigma^2 (noise RMS = sigma x the output's RMS), and the mean per-pixel Bernoulli KL of every mask-logit
map the decoder produces (Mix-QSAM's output measure, `mqsam2.kl_importance`) is divided by sigma^2:

    g_l = mean KL(Bern(sigmoid(z)) || Bern(sigmoid(z_l))) / sigma^2,        cost_l(b) = g_l * e_l(b)

For small perturbations the KL grows with the square of the logit change, so cost_l(b) estimates, to first
order, the mask KL that quantizing layer l alone at b bits causes. sigma^2 defaults to 0.05, the size of a
4-bit per-tensor input error on this model, so the gain is taken where the allocation decides. One pass of
the samples per layer.

That first-order reading fails where it matters most. Isotropic noise spreads over every output direction,
while a quantization error `W (Q(x) - x)` lies where the layer's weight sends it, which is where the rest of
the network listens, and at 3 bits the masks respond far from linearly. On the trained SAM2.1-tiny the gains
underestimate the mask KL of a 3-bit input 18-40x for the Hiera MLP and attention inputs and overestimate
the decoder's high-resolution convolutions 10x, so the allocation's predicted 4x lower KL was none at all
(docs/accuracy.md). `measure_mask_kl` (`allocation.error: mask`) therefore measures the cost itself: the
mask KL with the layer's weight, or its input, alone quantized at each candidate width, with the quantizers
calibration will set. Two passes of the samples per layer and width.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mqsam2.errors import MQSAM2Error
from mqsam2.kl_importance import decoder_logits, mean_kl
from mqsam2.sensitivity import WidthQuantizers, layer_output

log = logging.getLogger(__name__)


def _noisy_output(generator: torch.Generator, sigma: float) -> Callable:
    def hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        rms = output.detach().float().square().mean().sqrt()
        noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=torch.float32)
        return output + (sigma * rms * noise).to(output.dtype)

    return hook


@torch.no_grad()
def measure_gains(
    model: nn.Module,
    samples: Sequence[Callable[[], None]],
    layers: Mapping[str, nn.Module],
    noise_power: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """{layer: g_l} for every layer of `layers` (modules of `model`) that the samples reach.

    Each sample runs one calibration sample through the float `model` (a clip tracked from its prompts, an image
    segmented from its boxes); it is called once for the reference masks and once per reached layer.
    """
    if noise_power <= 0:
        raise MQSAM2Error(f"noise_power must be positive, got {noise_power}")
    reached: set[str] = set()
    handles = [
        layer.register_forward_hook(lambda _m, _a, _o, name=name: reached.add(name))
        for name, layer in layers.items()
    ]
    try:
        references = [decoder_logits(model, sample) for sample in samples]
    finally:
        for handle in handles:
            handle.remove()
    if not reached:
        raise MQSAM2Error("the samples reached none of the layers to measure")
    gains = {}
    sigma = noise_power**0.5
    for index, name in enumerate(n for n in layers if n in reached):
        layer = layers[name]
        device = layer.weight.device
        generator = torch.Generator(device).manual_seed(seed + index)
        handle = layer.register_forward_hook(_noisy_output(generator, sigma))
        try:
            kl = [
                mean_kl(ref, decoder_logits(model, sample))
                for ref, sample in zip(references, samples, strict=True)
            ]
        finally:
            handle.remove()
        gains[name] = sum(kl) / len(kl) / noise_power
    log.info("propagation gains of %d layers from %d samples", len(gains), len(samples))
    return gains


def quantized_output(
    quantizer: WidthQuantizers, bits: int, side: str
) -> Callable[[nn.Module, Tensor], Tensor]:
    """A layer's forward with its weight (`side` "w") or its input ("a") fake-quantized at `bits`."""
    k = quantizer.candidates.index(bits)
    if side == "w":
        return lambda m, x: layer_output(m, x, quantizer.weights[k])
    return lambda m, x: layer_output(m, quantizer.quantized_input(x, k), m.weight)


@torch.no_grad()
def mask_kl_with(
    model: nn.Module,
    samples: Sequence[Callable[[], None]],
    references: Sequence[Sequence[Tensor]],
    forwards: Mapping[nn.Module, Callable[[nn.Module, Tensor], Tensor]],
) -> float:
    """The samples' mean mask KL against `references` with each module of `forwards` computing its output
    from its input by that function instead (e.g. `quantized_output`), every other module as it is."""

    def replaced(compute: Callable) -> Callable:
        return lambda module, args, kwargs, _out: compute(module, args[0] if args else kwargs["input"])

    handles = [
        module.register_forward_hook(replaced(compute), with_kwargs=True)
        for module, compute in forwards.items()
    ]
    try:
        kl = [
            mean_kl(ref, decoder_logits(model, sample))
            for ref, sample in zip(references, samples, strict=True)
        ]
    finally:
        for handle in handles:
            handle.remove()
    return sum(kl) / len(kl)


@torch.no_grad()
def measure_mask_kl(
    model: nn.Module,
    samples: Sequence[Callable[[], None]],
    layers: Mapping[str, nn.Module],
    quantizers: Mapping[str, WidthQuantizers],
    widths: Sequence[int] | None = None,
) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """{layer: (weight KL, input KL)}, each `{str(bits): mean mask KL over the samples}` with only that
    layer's weight (or only its input) quantized at that width, every other layer in floating point.

    `quantizers` (from `sensitivity.calibrate_quantizers`) name the layers to measure, at `widths` among
    their candidates (default: all of them); each sample runs one calibration sample through the float
    `model`, once for the reference masks and twice per layer and width.
    """
    names = [name for name in quantizers if name in layers]
    if not names:
        raise MQSAM2Error("no calibrated quantizer belongs to the layers to measure")
    calibrated = quantizers[names[0]].candidates
    widths = calibrated if widths is None else sorted(int(b) for b in widths)
    if not set(widths) <= set(calibrated):
        raise MQSAM2Error(f"mask KL widths {widths} are not all among the calibrated widths {calibrated}")
    references = [decoder_logits(model, sample) for sample in samples]
    start = time.perf_counter()
    result = {}
    passes = tqdm(total=2 * len(widths) * len(names), desc="mask KL", unit="pass")
    for name in names:
        layer, quantizer = layers[name], quantizers[name]
        tables: tuple[dict[str, float], dict[str, float]] = ({}, {})
        for bits in widths:
            for table, side in zip(tables, ("w", "a"), strict=True):
                forward = quantized_output(quantizer, bits, side)
                table[str(bits)] = mask_kl_with(model, samples, references, {layer: forward})
                passes.update()
        result[name] = tables
    passes.close()
    log.info(
        "mask KL of %d layers from %d samples in %.1f s",
        len(result),
        len(samples),
        time.perf_counter() - start,
    )
    return result
