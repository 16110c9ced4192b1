"""PTQ4SAM's Bimodal Integration (BIG): where an attention module's keys are bimodal, negate the q and k
projection channels whose mean is negative, so both modes fold onto one side and a per-tensor quantizer of k
spends its grid on one mode instead of the empty gap between two.

Why the float model is unchanged: an attention logit is `sum_c q_c k_c`, and `(-q_c)(-k_c) = q_c k_c` exactly,
so negating the same channel of q and k (the rows of the q and k projection weight and bias) leaves every
logit, hence every output, as it was. Per SAM2 attention class:
- `Attention` (mask decoder): rows of `q_proj` and `k_proj`.
- `RoPEAttention` (memory attention): RoPE rotates the channel pairs (2j, 2j+1) of each head by a position
  angle. A rotation commutes with negating a whole pair but not with negating one of its channels, so pairs
  flip together, with the sign of the pair's summed channel means.
- Hiera's `MultiScaleAttention` (one fused `qkv`): its q and k rows. Blocks that max-pool the queries are
  skipped, since `max(-x) != -max(x)`.

The test is PTQ4SAM's, with its parameters: the keys exactly as the attention matmul sees them (after RoPE) are
sampled uniformly over all calibration passes (up to 20,000 values); their Gaussian KDE (scipy, Scott's
bandwidth) is evaluated on 128 points spanning the sample's range, and the keys are bimodal when
`scipy.signal.find_peaks` finds exactly two peaks of height >= 1% of the density's sum, at least 32 points
apart. A bimodal module's channel c flips when the mean of k_c over the calibration passes is negative.

Unlike PTQ4SAM's code, which tests the first sample of the first calibration batch of the mask decoder's
attention only, every eligible attention module is tested on a sample of the whole calibration set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam.transformer import RoPEAttention
from scipy.signal import find_peaks
from scipy.stats import gaussian_kde
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.swap import ATTENTION_CLASSES, is_quantized

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BimodalTest:
    """PTQ4SAM's bimodality test (module docstring): two KDE peaks on a `grid`-point evaluation."""

    grid: int = 128
    peak_height: float = 0.01
    peak_distance: int = 32
    sample_size: int = 20_000

    def is_bimodal(self, values: Tensor) -> bool:
        data = values.detach().double().flatten().cpu().numpy()
        if data.size < 3 or data.min() == data.max():
            return False
        density = gaussian_kde(data)(np.linspace(data.min(), data.max(), self.grid))
        peaks, _ = find_peaks(density, height=self.peak_height * density.sum(), distance=self.peak_distance)
        return len(peaks) == 2


def eligible_attention(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules whose q/k channels can flip exactly (all but Hiera's query-pooling blocks)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, ATTENTION_CLASSES)
        and not (isinstance(module, MultiScaleAttention) and module.q_pool is not None)
    }


@torch.no_grad()
def flip_query_key_channels(module: nn.Module, signs: Tensor) -> None:
    """Multiply the q and k projection rows (weight and bias) of one attention module by `signs` (+-1 per
    channel, head-major as the projection lays them out); the module's output is unchanged."""
    if isinstance(module, MultiScaleAttention):
        if module.q_pool is not None:
            raise MQSAM2Error(
                "this Hiera block max-pools its queries, so flipping q channels would change it"
            )
        rows = torch.cat([signs, signs, torch.ones_like(signs)]).to(module.qkv.weight)
        projections = [(module.qkv, rows)]
    else:
        if isinstance(module, RoPEAttention) and not torch.equal(signs[0::2], signs[1::2]):
            raise MQSAM2Error(
                "RoPE rotates channel pairs (2j, 2j+1): both channels of a pair must flip together"
            )
        projections = [(module.q_proj, signs), (module.k_proj, signs)]
    for projection, rows in projections:
        rows = rows.to(projection.weight)
        projection.weight.mul_(rows[:, None])
        if projection.bias is not None:
            projection.bias.mul_(rows)


class _KeyStats:
    """Channel sums of one module's keys and a uniform bottom-k sample of their values (kept on k's device)."""

    def __init__(self, sample_size: int):
        self.sample_size = sample_size
        self.sums: Tensor | None = None
        self.count = 0
        self.values: Tensor | None = None
        self.keys: Tensor | None = None
        self.generator: torch.Generator | None = None

    def update(self, k: Tensor) -> None:
        """`k` as scaled_dot_product_attention takes it: [batch, heads, tokens, channels per head]."""
        rows = (
            k.detach().float().transpose(1, 2).flatten(2).flatten(0, 1)
        )  # [batch * tokens, heads * channels]
        sums = rows.sum(0, dtype=torch.float64)
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += rows.shape[0]
        if self.generator is None:
            self.generator = torch.Generator(device=rows.device).manual_seed(0)
        values = rows.flatten()
        keys = torch.rand(values.shape, generator=self.generator, device=values.device)
        if self.values is not None:
            values, keys = torch.cat([self.values, values]), torch.cat([self.keys, keys])
        if len(values) > self.sample_size:
            keys, index = torch.topk(keys, self.sample_size, largest=False)
            values = values[index]
        self.values, self.keys = values, keys

    def signs(self, rope: bool) -> Tensor:
        means = self.sums.cpu() / self.count
        if rope:
            means = (means[0::2] + means[1::2]).repeat_interleave(2)
        return torch.where(means < 0, -1.0, 1.0)


class _KeyRecorder(TorchFunctionMode):
    """Hands the keys of every attention matmul to the stats of the module running it."""

    def __init__(self):
        super().__init__()
        self.running: list[_KeyStats] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.running:
            self.running[-1].update(args[1] if len(args) > 1 else kwargs["key"])
        return func(*args, **kwargs)


def key_statistics(model: nn.Module, run: Callable[[], None], sample_size: int) -> dict[str, _KeyStats]:
    """Stats of the keys of every eligible attention module over the passes `run()` makes."""
    modules = eligible_attention(model)
    stats = {name: _KeyStats(sample_size) for name in modules}
    recorder = _KeyRecorder()
    handles = []

    def leave(*_) -> None:
        recorder.running.pop()

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda *_, s=stats[name]: recorder.running.append(s)))
        handles.append(module.register_forward_hook(leave))
    try:
        with recorder:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: s for name, s in stats.items() if s.count}


def integrate_bimodal(
    model: nn.Module, run: Callable[[], None], test: BimodalTest | None = None
) -> dict[str, Tensor]:
    """Test every eligible attention module of a float SAM2 on the passes `run()` makes and flip the q/k
    channels of the bimodal ones in place; returns `{module: signs}` of the modules flipped."""
    if is_quantized(model):
        raise MQSAM2Error("Bimodal Integration reparametrises the float model: run it before quantize()")
    test = test or BimodalTest()
    modules = eligible_attention(model)
    flipped = {}
    for name, stats in key_statistics(model, run, test.sample_size).items():
        if not test.is_bimodal(stats.values):
            continue
        signs = stats.signs(rope=isinstance(modules[name], RoPEAttention))
        if (signs < 0).any():
            flip_query_key_channels(modules[name], signs)
            flipped[name] = signs
    log.info(
        "Bimodal Integration: %d of %d attention modules flipped (%s)",
        len(flipped),
        len(modules),
        ", ".join(flipped) or "none bimodal",
    )
    return flipped
