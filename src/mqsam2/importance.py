"""Weight-Activation Importance Score of Mix-QSAM2 (Eq. 2-4), streamed over calibration data by forward hooks.

For a layer with weight W and calibration inputs X (N tokens x C_in channels), the channel norm is
`A_j = sqrt(sum_n X[n, j]^2)` (Eq. 2) and the score is `S = mean_ij |W_ij| * A_j` (Eq. 3-4).
A Conv2d is the Linear that acts on its unfolded patches: its input channels are the
(input channel, kernel row, kernel column) positions, its tokens the (batch item, output position) pairs.
Only per-channel sums of squares are kept, in float64, so calibration activations are never stored and the
result does not depend on how the data is batched; under `torch.distributed` the sums are all-reduced, so
every rank scores the union of the data.
"""

import json
import logging
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mqsam2.errors import MQSAM2Error
from mqsam2.files import write_text

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Linear, nn.Conv2d)


class LayerImportance(NamedTuple):
    """Score S_l of Eq. 4, the parameter count p_l of Eq. 6 and what a fair activation budget weighs.

    `num_params` counts weight elements only: the weights are what a bit-width plan quantizes, and a bias is a
    rounding error next to them. `act_elements` counts the input elements the layer saw over the calibration
    set (what an activation bit budget is weighted by). `weight_errors` / `act_errors`, when measured
    (`mqsam2.sensitivity`), map a bit-width to the layer's relative output error with only its weights / only
    its input quantized at that width. `gain`, when measured (`mqsam2.propagation`), is how much of a relative
    output error reaches the masks; `weight_mask_kl` / `act_mask_kl` are the mask KL itself at each width, with
    only this layer's weights / only its input quantized (`propagation.measure_mask_kl`).
    """

    score: float
    num_params: int
    act_elements: int = 0
    weight_errors: dict[str, float] | None = None
    act_errors: dict[str, float] | None = None
    gain: float | None = None
    weight_mask_kl: dict[str, float] | None = None
    act_mask_kl: dict[str, float] | None = None


def sum_of_squares(x: Tensor, channel_dim: int = -1) -> Tensor:
    """Per-channel sum of squares of x over every other dimension, in float64."""
    x = x.detach().double().movedim(channel_dim, -1)
    return x.square().reshape(-1, x.shape[-1]).sum(0)


def channel_norms(x: Tensor, channel_dim: int = -1) -> Tensor:
    """Eq. 2: the L2 norm of each input channel over all tokens (every dimension but `channel_dim`)."""
    return sum_of_squares(x, channel_dim).sqrt()


def patch_sum_of_squares(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Sum of squares of the conv's unfolded input per (input channel, kernel row, kernel column), in float64.

    Equals `F.unfold(x_padded, ...)` squared and summed over batch and output positions, but sums strided
    views of the squared padded input instead of materialising the kh*kw times larger unfolded tensor.
    """
    x = x.detach().double()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    squares = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode).square().sum(0)
    kernel_h, kernel_w = conv.kernel_size
    stride_h, stride_w = conv.stride
    dilation_h, dilation_w = conv.dilation
    out_h = (squares.shape[1] - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (squares.shape[2] - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    sums = squares.new_empty(squares.shape[0], kernel_h, kernel_w)
    for u in range(kernel_h):
        for v in range(kernel_w):
            top, left = u * dilation_h, v * dilation_w
            window = squares[
                :,
                top : top + stride_h * (out_h - 1) + 1 : stride_h,
                left : left + stride_w * (out_w - 1) + 1 : stride_w,
            ]
            sums[:, u, v] = window.sum((1, 2))
    return sums


def weight_activation_score(weight: Tensor, channel_norms: Tensor) -> float:
    """Eq. 3-4: the mean over the weight's elements of |W_ij| * A_j.

    `channel_norms` has shape (C_in,) for a Linear weight (C_out, C_in) and (C_in, kh, kw) for a Conv2d weight
    (C_out, C_in / groups, kh, kw); the group count follows from the two shapes, and an output channel of
    group g reads the input channels of group g only.
    """
    if weight.shape[2:] != channel_norms.shape[1:] or channel_norms.shape[0] % weight.shape[1]:
        raise ValueError(
            f"channel norms of shape {tuple(channel_norms.shape)} do not fit weight {tuple(weight.shape)}"
        )
    groups = channel_norms.shape[0] // weight.shape[1]
    if weight.shape[0] % groups:
        raise ValueError(f"{weight.shape[0]} output channels do not split into {groups} groups")
    magnitudes = weight.detach().double().abs().reshape(groups, weight.shape[0] // groups, -1)
    norms = channel_norms.to(device=weight.device, dtype=torch.float64).reshape(groups, 1, -1)
    return (magnitudes * norms).sum().item() / weight.numel()


def _input_shape(layer: nn.Module) -> tuple[int, ...]:
    """Shape of the channel norms of a layer: (C_in,) for a Linear, (C_in, kh, kw) for a Conv2d."""
    if isinstance(layer, nn.Conv2d):
        return (layer.in_channels, *layer.kernel_size)
    return (layer.in_features,)


class ImportanceCollector:
    """Hooks layers, streams the sums of squares of their inputs through any forward passes, and scores them.

    Hooks every nn.Linear and nn.Conv2d of `model` (subclasses included) or the layers named in `layer_names`:

        with ImportanceCollector(model) as collector:
            run_calibration(model)
        importance = collector.compute()  # {name: LayerImportance}, in `model.named_modules()` order
    """

    def __init__(self, model: nn.Module, layer_names: Iterable[str] | None = None) -> None:
        modules = dict(model.named_modules())
        if layer_names is None:
            self.layers = {name: m for name, m in modules.items() if isinstance(m, QUANTIZABLE)}
        else:
            wanted = set(layer_names)
            unknown = sorted(name for name in wanted if not isinstance(modules.get(name), QUANTIZABLE))
            if unknown:
                raise ValueError(f"not an nn.Linear or nn.Conv2d of the model: {', '.join(unknown)}")
            self.layers = {name: m for name, m in modules.items() if name in wanted}
        if not self.layers:
            raise ValueError("no nn.Linear or nn.Conv2d layer to hook")
        self._sums: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        self._elements: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Self:
        # Buffers made under torch.inference_mode would refuse compute()'s in-place all-reduce outside it.
        with torch.inference_mode(False):
            self._sums = {
                name: torch.zeros(_input_shape(layer), dtype=torch.float64, device=layer.weight.device)
                for name, layer in self.layers.items()
            }
        self._calls = dict.fromkeys(self.layers, 0)
        self._elements = dict.fromkeys(self.layers, 0)
        self._handles = [
            layer.register_forward_pre_hook(partial(self._accumulate, name), with_kwargs=True)
            for name, layer in self.layers.items()
        ]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _accumulate(self, name: str, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        with torch.no_grad():
            if isinstance(layer, nn.Conv2d):
                self._sums[name] += patch_sum_of_squares(x, layer)
            else:
                self._sums[name] += sum_of_squares(x)
        self._calls[name] += 1
        self._elements[name] += x.numel()

    def compute(self, required: Iterable[str] = ()) -> dict[str, LayerImportance]:
        """Scores of the hooked layers that saw input; all-reduces the sums first under torch.distributed.

        Every rank must call it (it is a collective then). A layer that saw no input on any rank is left out
        with a warning naming it (it stays in floating point: a score of zero would silently send it to the
        lowest bit-width); it is an error only for the layers named in `required`.
        """
        if not self._sums:
            raise RuntimeError("compute() needs the collector to have been entered")
        device = next(iter(self._sums.values())).device
        names = list(self._sums)
        counts = [[self._calls[name] for name in names], [self._elements[name] for name in names]]
        flat = torch.cat(
            [self._sums[name].flatten().to(device) for name in names]
            + [torch.tensor(counts, dtype=torch.float64, device=device).flatten()]
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        tail = flat[-2 * len(names) :].tolist()
        calls, elements = dict(zip(names, tail[: len(names)], strict=True)), tail[len(names) :]
        elements = dict(zip(names, elements, strict=True))
        sums = dict(
            zip(names, flat[: -2 * len(names)].split([self._sums[n].numel() for n in names]), strict=True)
        )
        unseen = [name for name in names if calls[name] == 0]
        missing = sorted(set(unseen) & set(required))
        if missing:
            raise MQSAM2Error(
                f"no calibration input reached {len(missing)} layer(s) that the plan names: {', '.join(missing)}; "
                "add calibration data that runs them (video clips for the memory modules, images for "
                "mask-prompt refinement) or drop them from the plan"
            )
        if unseen:
            log.warning(
                "no calibration input reached %d layer(s), which stay in floating point: %s",
                len(unseen),
                ", ".join(unseen),
            )
        return {
            name: LayerImportance(
                score=weight_activation_score(layer.weight, sums[name].reshape(_input_shape(layer)).sqrt()),
                num_params=layer.weight.numel(),
                act_elements=int(elements[name]),
            )
            for name, layer in self.layers.items()
            if calls[name] > 0
        }


def write_importance(importance: Mapping[str, LayerImportance], path: str | Path) -> Path:
    """Write `{name: {"score", "num_params"}}` as JSON (the run directory's importance.json)."""
    return write_text(
        path, json.dumps({name: imp._asdict() for name, imp in importance.items()}, indent=1) + "\n"
    )


def read_importance(path: str | Path) -> dict[str, LayerImportance]:
    """Read what `write_importance` wrote, in the same layer order."""
    return {name: LayerImportance(**entry) for name, entry in json.loads(Path(path).read_text()).items()}
