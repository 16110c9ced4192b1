"""Reconstruction steps replayed from CUDA graphs: each batch signature's forward and backward is captured once,
so a step costs two launches instead of hundreds (units are launch-bound at SAM2's sizes).

This is engineering around the step's maths, which stays in the LightningModule. The graphs, their memory pool
and the tensors feeding the step's scalars live here, outside the module tree, so checkpoints look the same with
and without them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn

from mqsam2.reconstruct.cache import Batch, UnitCache

# (batch, beta) -> (reconstruction loss, rounding regulariser or None): the maths of one step.
StepTerms = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _autocast_without_cache() -> torch.autocast:
    """The autocast in force (the Trainer's) without its weight cache, which CUDA graphs cannot hold."""
    return torch.autocast(
        "cuda",
        dtype=torch.get_autocast_dtype("cuda"),
        enabled=torch.is_autocast_enabled("cuda"),
        cache_enabled=False,
    )


class GraphedSteps:
    """A unit's training steps as CUDA graphs, one per batch signature and tensor shapes, sharing one pool.

    `terms` computes a step's losses, `learned` is the module whose parameters get gradients, `reg_weight`
    weighs the regulariser once beta is set, and `regularised` says whether `terms` gives one at all.
    """

    def __init__(self, terms: StepTerms, learned: nn.Module, reg_weight: float, regularised: bool):
        self.terms = terms
        self.learned = learned
        self.reg_weight = reg_weight
        self.regularised = regularised
        self._graphs: dict[tuple, nn.Module] = {}
        self._pool = None
        # beta and the regulariser's weight: tensors the graphs read, refilled before every replay.
        self._scalars: tuple[torch.Tensor, torch.Tensor] | None = None

    def capture(self, cache: UnitCache, batch_size: int, device: torch.device) -> None:
        """Capture every batch signature of `cache` before the first step, so no step pays for a capture. Call it
        inside the autocast the steps run under (the Trainer's precision context)."""
        if self._scalars is None:
            self._scalars = (torch.zeros((), device=device), torch.zeros((), device=device))
        for group, members in enumerate(cache.groups):
            size = min(batch_size if cache.batchable else 1, len(members))
            self._graph(group, cache.batch(members[:size], device=device))

    def step(
        self, group: int, batch: Batch, beta: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss, reconstruction loss, regulariser or None) of one step on `batch` of signature `group`, its
        forward replayed now and its backward when the loss's backward runs. Needs `capture` first."""
        graph = self._graph(group, batch)
        with _autocast_without_cache():
            loss, terms = graph(*self._inputs(batch, beta))
        return loss, terms[0], None if beta is None or not self.regularised else terms[1]

    def clear(self) -> None:
        """Drop the graphs and collect them now: they sit in reference cycles, and a graph the collector frees in
        the middle of the next unit's capture would invalidate that capture."""
        self._graphs.clear()
        gc.collect()

    def _graph(self, group: int, batch: Batch) -> nn.Module:
        """The graphed step of one batch signature and tensor shapes (a signature fixes all but the leading
        dimension, and samples may hold several rows), captured on first use."""
        key = (group, *(tuple(x.shape) for x in batch.tensors()))
        if key not in self._graphs:
            # A graph freed by the garbage collector in the middle of a capture invalidates that capture.
            gc.collect()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with _autocast_without_cache():
                self._graphs[key] = torch.cuda.make_graphed_callables(
                    _GroupStep(self.terms, self.learned, batch),
                    tuple(x.clone() for x in self._inputs(batch, None)),
                    allow_unused_input=True,
                    pool=self._pool,
                )
        return self._graphs[key]

    def _inputs(self, batch: Batch, beta: float | None) -> tuple[torch.Tensor, ...]:
        beta_t, reg_weight_t = self._scalars
        beta_t.fill_(2.0 if beta is None else beta)
        reg_weight_t.fill_(0.0 if beta is None else self.reg_weight)
        return (beta_t, reg_weight_t, *batch.tensors())


class _GroupStep(nn.Module):
    """One batch signature's loss as a function of tensors only (what CUDA graph capture needs); the
    regulariser is always computed and weighted by a tensor, zero during the warm-up. `learned` is a submodule
    so that capture gives its parameters gradients."""

    def __init__(self, terms: StepTerms, learned: nn.Module, template: Batch):
        super().__init__()
        self.learned = learned
        self.terms = terms
        self.template = template

    def forward(self, beta: torch.Tensor, reg_weight: torch.Tensor, *tensors: torch.Tensor):
        rec, reg = self.terms(self.template.with_tensors(tensors), beta)
        if reg is None:
            return rec, torch.stack([rec, torch.zeros_like(rec)]).detach()
        return rec + reg_weight * reg, torch.stack([rec, reg]).detach()
