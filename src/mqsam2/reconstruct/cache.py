"""The calibration tensors of one unit: its inputs in the quantized and float models and the float outputs.

Calls are recorded with forward hooks while the normal SAM2 code runs (so every unit sees exactly the inputs
it sees in deployment), flattened with pytree so units with any signature share one code path, and split
into single samples so batches can be drawn at random. Tensors recorded under sam2's `inference_mode` are
cloned outside it, so autograd can use them. Each call keeps its (clip, frame) position in the calibration
videos (`mqsam2.reconstruct.positions`), so losses can relate a frame to earlier frames of its clip.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from mqsam2.errors import MQSAM2Error
from mqsam2.reconstruct.positions import Position, current_position, current_rows

log = logging.getLogger(__name__)


@dataclass
class Call:
    """One recorded call: flattened (args, kwargs), flattened output, and where in the videos it ran."""

    inputs: list[Any]
    input_spec: TreeSpec
    outputs: list[Any]
    output_spec: TreeSpec
    position: Position | None = None


def _detach_copy(leaf: Any, device: torch.device) -> Any:
    if not isinstance(leaf, torch.Tensor):
        return leaf
    with torch.inference_mode(False):
        return leaf.detach().to(device, copy=True)


def copy_call(args: tuple, kwargs: dict, output: Any, device: torch.device) -> Call:
    """One call of a module (what a forward hook sees), its tensors copied to `device`."""
    inputs, input_spec = tree_flatten((args, kwargs))
    outputs, output_spec = tree_flatten(output)
    return Call(
        [_detach_copy(x, device) for x in inputs],
        input_spec,
        [_detach_copy(x, device) for x in outputs],
        output_spec,
        current_position(),
    )


def recorded_calls(args: tuple, kwargs: dict, output: Any, device: torch.device) -> list[Call]:
    """The calls the one-object-at-a-time tracker makes: a call of the batched tracker (`mqsam2.memory.batched`)
    is split into one call per batch row, each with its row's (clip, frame). An input the rows share (the
    object-pointer time encoding has no batch dimension) stays one call."""
    call = copy_call(args, kwargs, output, device)
    rows = current_rows()
    if rows is None:
        return [call]
    calls = split_batch(call) if len(rows) > 1 else [call]
    if len(calls) != len(rows):
        call.position = rows[0]
        return [call]
    for sample, position in zip(calls, rows, strict=True):
        sample.position = position
    return calls


def call_nbytes(call: Call) -> int:
    return sum(x.nbytes for x in (*call.inputs, *call.outputs) if isinstance(x, torch.Tensor))


@contextlib.contextmanager
def record_calls(module: nn.Module, device: torch.device | str = "cpu") -> Iterator[list[Call]]:
    """Every call of `module` inside the block, copied to `device`."""
    calls: list[Call] = []
    device = torch.device(device)

    def hook(_module, args, kwargs, output):
        calls.extend(recorded_calls(args, kwargs, output, device))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def split_batch(call: Call) -> list[Call]:
    """Per-sample calls from a batched one (tensors whose dim 0 is the batch are sliced, the rest shared)."""
    tensors = [x for x in call.inputs if isinstance(x, torch.Tensor) and x.ndim > 0]
    if not tensors or tensors[0].shape[0] == 1:
        return [call]
    batch = tensors[0].shape[0]

    def pick(leaves: list[Any], i: int) -> list[Any]:
        return [
            x[i : i + 1] if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch else x
            for x in leaves
        ]

    return [
        Call(pick(call.inputs, i), call.input_spec, pick(call.outputs, i), call.output_spec, call.position)
        for i in range(batch)
    ]


def _signature(call: Call) -> tuple:
    """What must agree for samples to be concatenated into one batch."""
    return (
        str(call.input_spec),
        tuple(tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else repr(x) for x in call.inputs),
    )


@dataclass
class Batch:
    inputs_q: list[Any]
    inputs_fp: list[Any]
    input_spec: TreeSpec
    targets: list[Any]
    output_spec: TreeSpec

    def unflatten(self, leaves: list[Any]) -> tuple[tuple, dict]:
        return tree_unflatten(leaves, self.input_spec)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch (quantized inputs, float inputs, targets) in a fixed order."""
        return [x for x in (*self.inputs_q, *self.inputs_fp, *self.targets) if isinstance(x, torch.Tensor)]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
        """On `device`, floating tensors cast to `dtype`."""
        return self.with_tensors([_convert(x, device, dtype) for x in self.tensors()])

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> Batch:
        """The same batch with its tensors replaced, in the order of `tensors()` (CUDA graphs feed their own)."""
        supply = iter(tensors)

        def refill(leaves: list[Any]) -> list[Any]:
            return [next(supply) if isinstance(x, torch.Tensor) else x for x in leaves]

        return Batch(
            refill(self.inputs_q),
            refill(self.inputs_fp),
            self.input_spec,
            refill(self.targets),
            self.output_spec,
        )


def _convert(x: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)


def _concatenate(column: Sequence[torch.Tensor], device: torch.device | None) -> torch.Tensor:
    first = column[0]
    if device is None:
        return torch.cat(column) if first.ndim > 0 else first
    if first.ndim == 0:
        return first.to(device, non_blocking=True)
    out = torch.empty((sum(len(x) for x in column), *first.shape[1:]), dtype=first.dtype, device=device)
    row = 0
    for x in column:
        out[row : row + len(x)].copy_(x, non_blocking=True)
        row += len(x)
    return out


class UnitCache:
    """Samples of one unit, grouped by signature; batches are drawn deterministically from a step number."""

    def __init__(self, quant_calls: list[Call], float_calls: list[Call], batchable: bool, unit_name: str):
        if len(quant_calls) != len(float_calls):
            raise MQSAM2Error(
                f"unit {unit_name}: the quantized model called it {len(quant_calls)} times and the float model "
                f"{len(float_calls)} times on the same data; both must follow the same path"
            )
        if not quant_calls:
            raise MQSAM2Error(f"unit {unit_name} was never called on the calibration data")
        if batchable:
            quant_calls = [s for c in quant_calls for s in split_batch(c)]
            float_calls = [s for c in float_calls for s in split_batch(c)]
        self.unit_name = unit_name
        self.quant = quant_calls
        self.float = float_calls
        self.batchable = batchable
        groups: dict[tuple, list[int]] = {}
        for index, call in enumerate(quant_calls):
            groups.setdefault(_signature(call), []).append(index)
        self.groups = list(groups.values())
        self.group_of = [0] * len(quant_calls)
        for group_index, members in enumerate(self.groups):
            for index in members:
                self.group_of[index] = group_index
        self.group_sizes = torch.tensor([len(g) for g in self.groups], dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.quant)

    @property
    def nbytes(self) -> int:
        return sum(
            x.numel() * x.element_size()
            for calls in (self.quant, self.float)
            for call in calls
            for x in (*call.inputs, *call.outputs)
            if isinstance(x, torch.Tensor)
        )

    @property
    def device(self) -> torch.device:
        return next(x.device for x in self.quant[0].inputs if isinstance(x, torch.Tensor))

    def copy(self) -> UnitCache:
        """A cache sharing these tensors with call lists of its own: moving or casting it leaves this one."""
        new = copy.copy(self)
        new.quant = [dataclasses.replace(call) for call in self.quant]
        new.float = [dataclasses.replace(call) for call in self.float]
        return new

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UnitCache:
        """Moved (and floating tensors cast to `dtype`) in place, one tensor at a time."""
        for calls in (self.quant, self.float):
            for call in calls:
                call.inputs = [_convert(x, device, dtype) for x in call.inputs]
                call.outputs = [_convert(x, device, dtype) for x in call.outputs]
        return self

    def pin(self) -> UnitCache:
        """Host tensors moved to page-locked memory, so copies to the GPU run asynchronously."""
        for calls in (self.quant, self.float):
            for call in calls:
                call.inputs = [x.pin_memory() if isinstance(x, torch.Tensor) else x for x in call.inputs]
                call.outputs = [x.pin_memory() if isinstance(x, torch.Tensor) else x for x in call.outputs]
        return self

    def indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """A batch of samples sharing one signature; a pure function of (seed, step) so a resumed run
        draws exactly the batches an uninterrupted one would."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        group = self.groups[int(torch.multinomial(self.group_sizes, 1, generator=generator))]
        size = min(batch_size if self.batchable else 1, len(group))
        picks = torch.randperm(len(group), generator=generator)[:size]
        return [group[int(i)] for i in picks]

    def batch(self, indices: list[int], device: torch.device | None = None) -> Batch:
        """The samples concatenated, on `device` (default: where the cache is). From host memory each sample
        is copied into its rows of the batch directly, asynchronously when the host memory is pinned."""

        def stack(calls: list[Call], attr: str) -> list[Any]:
            columns = zip(*(getattr(c, attr) for c in calls), strict=True)
            return [
                _concatenate(col, device) if isinstance(col[0], torch.Tensor) else col[0] for col in columns
            ]

        quant = [self.quant[i] for i in indices]
        floats = [self.float[i] for i in indices]
        return Batch(
            inputs_q=stack(quant, "inputs"),
            inputs_fp=stack(floats, "inputs"),
            input_spec=quant[0].input_spec,
            targets=stack(floats, "outputs"),
            output_spec=quant[0].output_spec,
        )
