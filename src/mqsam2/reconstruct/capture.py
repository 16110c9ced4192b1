"""Where each unit's calibration tensors come from: its inputs in the quantized model with every earlier unit
reconstructed, its inputs and outputs in the float model (method.md §5).

`reconstruction.capture` picks how they are produced (docs/benchmarks.md has what each costs):

- "replay": every unit outside the Hiera chain replays the whole calibration workload through both models.
- "sequential" (default), in the spirit of llm-compressor's sequential pipeline: the float model runs the
  workload once for all units. The image encoder needs no pass after its first block: each Hiera block's
  inputs are the previous block's outputs, computed from that block's cached inputs once it is reconstructed,
  and the neck gathers the stage ends the same way. Units fed by the tracking loop (memory attention, memory
  encoder, mask decoder, heads) still get one quantized replay each: on every frame after the first, their
  inputs depend on every other loop unit's outputs on earlier frames (the memory bank, object pointers), so
  only a pass of the model with the earlier units reconstructed gives them exactly. Same tensors as "replay".
- "shared": as "sequential", but one quantized replay, made when the first loop unit starts, records every loop
  unit's inputs at once; memory-attention layers and mask-decoder blocks then chain within each frame from the
  previous layer's reconstructed outputs. An approximation: what reaches a loop unit from earlier frames was
  computed by loop units still at round-to-nearest. One replay instead of one per loop unit.

A restart recomputes everything the same way (finished units are loaded before the chain runs through them,
and the shared replay is made before any loop unit's finished state is loaded), so a resumed run sees the
tensors an uninterrupted one saw.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from mqsam2.reconstruct.cache import Call, UnitCache, call_nbytes, record_calls, recorded_calls, split_batch
from mqsam2.reconstruct.units import Link, Unit

if TYPE_CHECKING:
    from mqsam2.workload import Workload

log = logging.getLogger(__name__)

CAPTURE_MODES = ("replay", "sequential", "shared")
_HOST = torch.device("cpu")


def _to(leaves: list[Any], device: torch.device) -> list[Any]:
    """On `device`, floating tensors in float32 (caches may hold bf16; derivations compute as capture did)."""
    return [
        x.to(device, torch.float32 if x.is_floating_point() else None) if isinstance(x, torch.Tensor) else x
        for x in leaves
    ]


def _batches(cache: UnitCache, batch_size: int) -> Iterator[list[int]]:
    """Sample indices in batches of one signature."""
    step = batch_size if cache.batchable else 1
    for group in cache.groups:
        for start in range(0, len(group), step):
            yield group[start : start + step]


@torch.no_grad()
def chain_cache(
    previous: UnitCache,
    quant_previous: nn.Module,
    float_next: nn.Module,
    link: Link,
    unit_name: str,
    batch_size: int = 8,
) -> UnitCache:
    """The cache of a unit that SAM2 calls on the previous unit's output (`link` says how): its quantized call
    is linked from the finished previous unit run on its own quantized inputs, its float call from the previous
    float call and target, and its target is the float unit run on that. No model pass; samples keep their
    order and their (clip, frame) positions; the new cache is in host memory."""
    device = next(quant_previous.parameters()).device
    quant_calls: list[Call] = [None] * len(previous)  # type: ignore[list-item]
    float_calls: list[Call] = [None] * len(previous)  # type: ignore[list-item]
    for indices in _batches(previous, batch_size):
        batch = previous.batch(indices)
        args, kwargs = batch.unflatten(_to(batch.inputs_q, device))
        quant_args = link(args, kwargs, quant_previous(*args, **kwargs))
        args, kwargs = batch.unflatten(_to(batch.inputs_fp, device))
        float_args = link(args, kwargs, tree_unflatten(_to(batch.targets, device), batch.output_spec))
        outputs, output_spec = tree_flatten(float_next(*float_args[0], **float_args[1]))
        for calls, inputs, outs in (
            (quant_calls, quant_args, []),
            (float_calls, float_args, outputs),
        ):
            leaves, spec = tree_flatten(inputs)
            call = Call(_to(leaves, _HOST), spec, _to(outs, _HOST), output_spec)
            for index, sample in zip(
                indices, split_batch(call) if previous.batchable else [call], strict=True
            ):
                sample.position = previous.float[index].position  # the same frame of the same clip
                calls[index] = sample
    return UnitCache(quant_calls, float_calls, previous.batchable, unit_name)


@torch.no_grad()
def unit_outputs(module: nn.Module, cache: UnitCache, batch_size: int = 8) -> list[torch.Tensor]:
    """The (single-tensor) output of `module` on each sample's quantized inputs, on the host."""
    device = next(module.parameters()).device
    outputs: list[torch.Tensor] = [None] * len(cache)  # type: ignore[list-item]
    for indices in _batches(cache, batch_size):
        batch = cache.batch(indices)
        args, kwargs = batch.unflatten(_to(batch.inputs_q, device))
        for index, output in zip(indices, module(*args, **kwargs).to(_HOST).split(1), strict=True):
            outputs[index] = output
    return outputs


@torch.no_grad()
def gather_cache(
    quant_ends: list[list[torch.Tensor]],
    float_ends: list[list[torch.Tensor]],
    float_unit: nn.Module,
    unit_name: str,
    batch_size: int = 8,
) -> UnitCache:
    """The neck's cache from Hiera's stage ends: the trunk hands it `[x.permute(0, 3, 1, 2) for each stage's
    last output x]`. `quant_ends[s][i]` is stage s's output for sample i in the quantized model (its blocks
    reconstructed), `float_ends[s][i]` in the float model."""
    device = next(float_unit.parameters()).device
    quant_calls, float_calls = [], []
    for start in range(0, len(quant_ends[0]), batch_size):
        picks = slice(start, start + batch_size)
        quant_inputs = [torch.cat(stage[picks]).permute(0, 3, 1, 2) for stage in quant_ends]
        float_inputs = [torch.cat(_to(stage[picks], device)).permute(0, 3, 1, 2) for stage in float_ends]
        outputs, output_spec = tree_flatten(float_unit(float_inputs))
        for calls, inputs, outs in ((quant_calls, quant_inputs, []), (float_calls, float_inputs, outputs)):
            leaves, spec = tree_flatten(((inputs,), {}))
            calls.extend(split_batch(Call(_to(leaves, _HOST), spec, _to(outs, _HOST), output_spec)))
    return UnitCache(quant_calls, float_calls, batchable=True, unit_name=unit_name)


@contextlib.contextmanager
def record_units(
    model: nn.Module, names: list[str], budget_bytes: int | None = None
) -> Iterator[dict[str, list[Call]]]:
    """Every call of each named submodule inside the block, per name, in host memory: one pass records them
    all. When the recordings outgrow `budget_bytes`, the unit holding the most is dropped (its hook removed,
    its calls freed) and is missing from the result, to be recorded by a pass of its own."""
    recorded: dict[str, list[Call]] = {name: [] for name in names}
    sizes = dict.fromkeys(names, 0)
    handles = {}

    def hook_for(name: str):
        def hook(_module, args, kwargs, output):
            calls = recorded_calls(args, kwargs, output, _HOST)
            recorded[name].extend(calls)
            sizes[name] += sum(call_nbytes(call) for call in calls)
            while budget_bytes is not None and sum(sizes.values()) > budget_bytes:
                largest = max(sizes, key=sizes.__getitem__)
                log.info("  host budget: %s left for a pass of its own", largest)
                handles.pop(largest).remove()
                del recorded[largest], sizes[largest]

        return hook

    for name in names:
        handles[name] = model.get_submodule(name).register_forward_hook(hook_for(name), with_kwargs=True)
    try:
        yield recorded
    finally:
        for handle in handles.values():
            handle.remove()


def capture_unit(
    unit_name: str,
    quant_module: nn.Module,
    float_module: nn.Module,
    run_quant: Callable[[], None],
    run_float: Callable[[], None],
    batchable: bool,
    device: torch.device | str = "cpu",
) -> UnitCache:
    """Record the unit's calls in both models while each runs the same calibration workload."""
    with record_calls(float_module, device) as float_calls:
        run_float()
    with record_calls(quant_module, device) as quant_calls:
        run_quant()
    return UnitCache(quant_calls, float_calls, batchable, unit_name)


class Capturer:
    """Builds each unit's cache as the units are reconstructed in order, keeping what later units derive
    theirs from: the last cache (chains), Hiera's stage ends (the neck), the float pass and the shared replay."""

    def __init__(
        self,
        model: nn.Module,
        float_model: nn.Module,
        workload: Workload,
        units: list[Unit],
        mode: str = "sequential",
        batch_size: int = 8,
        place: Callable[[UnitCache], UnitCache] = lambda cache: cache,
        host_budget: Callable[[], int | None] = lambda: None,
    ):
        self.model = model
        self.float_model = float_model
        self.workload = workload
        self.units = {unit.name: unit for unit in units}
        self.mode = mode
        self.batch_size = batch_size
        self.place = place
        self.host_budget = host_budget  # bytes one pass may record for several units, asked before each pass
        self.seconds = 0.0  # spent in model passes and derivations, for the benchmark
        self._depth = 0
        self._last: tuple[str, UnitCache] | None = None
        self._stage_end_names = {name for unit in units for name in unit.gathers}
        self._sources = self._stage_end_names | {unit.follows for unit in units if unit.follows is not None}
        self._stage_ends: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._float: dict[str, list[Call]] = {}  # loop units' float calls, from the one float pass
        self._shared: dict[str, list[Call]] = {}  # loop units' quantized calls, from the shared replay
        self._float_pass_done = False
        self.plan(units, units)

    def plan(self, scheduled: list[Unit], pending: list[Unit]) -> None:
        """The units a run visits, in order, and those of them with work left: passes record only what
        pending units need, and the shared replay happens at the first scheduled loop unit."""
        self._first_loop = next((unit.name for unit in scheduled if unit.video_loop), None)
        self._recorded_roots = self._roots([unit for unit in pending if unit.video_loop])

    def _chained(self, unit: Unit) -> bool:
        """Derived from the previous unit instead of recorded: the Hiera chain always, memory-attention layers
        and decoder blocks in "shared" mode."""
        if unit.follows is None:
            return False
        return self.mode == "shared" or not unit.video_loop

    def _roots(self, loop_units: list[Unit]) -> list[str]:
        """Loop units whose calls a model pass records: the scheduled ones, or the head of their chain."""
        roots: list[str] = []
        for unit in loop_units:
            while self._chained(unit):
                unit = self.units[unit.follows]
            if unit.name not in roots:
                roots.append(unit.name)
        return roots

    def before(self, unit: Unit) -> None:
        """Called for every scheduled unit in order, before its finished state (if any) is loaded. The shared
        replay happens here, at the first loop unit, so a resumed run replays the model an uninterrupted one
        did."""
        if self.mode == "shared" and unit.name == self._first_loop and self._recorded_roots:
            start = time.perf_counter()
            self._shared.update(self._record_pass(self.model, self._recorded_roots, "shared quantized"))
            self.seconds += time.perf_counter() - start

    def capture(self, unit: Unit) -> UnitCache:
        """The unit's cache, placed for its fit (`place`: moved, cast to bf16, pinned). Later units derive
        theirs from the cache as captured (host, float32), so placement never compounds along a chain."""
        start = time.perf_counter()
        self._depth += 1
        try:
            cache = self._build(unit)
        finally:
            self._depth -= 1
        self._last = (unit.name, cache) if unit.name in self._sources else None
        placed = self.place(cache)
        if self._depth == 0:  # a chain re-derived after a restart counts once
            self.seconds += time.perf_counter() - start
        return placed

    def _build(self, unit: Unit) -> UnitCache:
        if self.mode != "replay" and unit.gathers:
            return self._gather(unit)
        if self._chained(unit):
            return self._chain(unit)
        if unit.video_loop and self.mode != "replay":
            return self._loop_unit(unit)
        return capture_unit(
            unit.name,
            unit.module,
            self.float_model.get_submodule(unit.name),
            run_quant=lambda: self.workload.run(self.model, unit.encoder_only),
            run_float=lambda: self.workload.run(self.float_model, unit.encoder_only),
            batchable=unit.batchable,
        )

    def _previous(self, name: str) -> UnitCache:
        """The cache of `name` as captured: the last one built, or built again (after a restart)."""
        if self._last is None or self._last[0] != name:
            self.capture(self.units[name])
        return self._last[1]

    def _chain(self, unit: Unit) -> UnitCache:
        before = self.units[unit.follows]
        previous = self._previous(before.name)
        float_unit = self.float_model.get_submodule(unit.name)
        cache = chain_cache(previous, before.module, float_unit, unit.link, unit.name, self.batch_size)
        if before.name in self._stage_end_names and self.mode != "replay":
            self._stage_ends[before.name] = (
                [call.inputs[0] for call in cache.quant],
                [call.inputs[0] for call in cache.float],
            )
        return cache

    def _gather(self, unit: Unit) -> UnitCache:
        """The neck, from Hiera's stage ends. The chain kept each stage end's outputs as it passed; the last
        block's are computed here. Asking for the last block's cache first re-derives the whole chain when a
        restart started past it."""
        last_name = unit.gathers[-1]
        last = self._previous(last_name)
        self._stage_ends[last_name] = (
            unit_outputs(self.units[last_name].module, last, self.batch_size),
            [call.outputs[0] for call in last.float],
        )
        ends = [self._stage_ends.pop(name) for name in unit.gathers]
        float_unit = self.float_model.get_submodule(unit.name)
        return gather_cache(
            [q for q, _ in ends], [f for _, f in ends], float_unit, unit.name, self.batch_size
        )

    def _loop_unit(self, unit: Unit) -> UnitCache:
        if not self._float_pass_done:
            self._float_pass_done = True
            names = list(dict.fromkeys([*self._recorded_roots, unit.name]))
            self._float.update(self._record_pass(self.float_model, names, "float"))
        float_calls = self._float.pop(unit.name, None)
        if float_calls is None:  # left out of the float pass (host budget) or not planned
            float_calls = self._record_pass(self.float_model, [unit.name], "float")[unit.name]
        quant_calls = self._shared.pop(unit.name, None)
        if quant_calls is None:
            quant_calls = self._record_pass(self.model, [unit.name], "quantized")[unit.name]
        return UnitCache(quant_calls, float_calls, unit.batchable, unit.name)

    def _record_pass(self, model: nn.Module, names: list[str], what: str) -> dict[str, list[Call]]:
        """One pass of the calibration set recording `names`, within the host budget (units that outgrow
        it are left out: a float pass of their own, or an exact replay, at their turn)."""
        start = time.perf_counter()
        budget = self.host_budget() if len(names) > 1 else None
        with record_units(model, names, budget) as recorded:
            self.workload.run(model, encoder_only=False)
        log.info("  %s pass recorded %d unit(s) in %.1f s", what, len(recorded), time.perf_counter() - start)
        return recorded
