"""The LightningModule that reconstructs one unit: AdaRound rounding + LSQ activation steps + QDrop.

It holds only the math; the Trainer (built by the driver) holds devices, DDP, precision, checkpoints and logs,
and `mqsam2.reconstruct.graphs` replays the steps from CUDA graphs.
Batches are drawn from the unit's cache by global step, so a resumed fit continues the exact sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from mqsam2.errors import MQSAM2Error
from mqsam2.reconstruct.cache import Batch, UnitCache
from mqsam2.reconstruct.graphs import GraphedSteps
from mqsam2.reconstruct.placement import BatchFeeder
from mqsam2.reconstruct.rounding import BetaSchedule, hardened_fraction, rounding_regularizer
from mqsam2.reconstruct.units import Unit

# (sample indices, unit outputs, float targets, reconstruction loss, run) -> the unit's objective, where
# run(indices) gives the quantized unit's outputs on other cached samples (Q-MiniSAM2's HVQ uses earlier frames).
UnitObjective = Callable[[Sequence[int], list, list, torch.Tensor, Callable[[list[int]], list]], torch.Tensor]


def reconstruction_loss(
    outputs: list, targets: list, channels_first: bool, require_grad: bool = True
) -> torch.Tensor:
    """||f_q(x) - f(x)||^2 summed over channels, averaged over tokens, added over the unit's outputs that
    depend on what is learned (constant outputs such as positional encodings are left out)."""
    total = None
    for out, target in zip(outputs, targets, strict=True):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            continue
        if require_grad and not out.requires_grad:
            continue
        diff = (out.float() - target.float()).pow(2)
        channel_dim = 1 if channels_first and diff.ndim >= 3 else -1
        term = diff.sum(dim=channel_dim).mean() if diff.ndim > 0 else diff
        total = term if total is None else total + term
    if total is None:
        raise MQSAM2Error("the unit's outputs do not depend on its quantized layers; nothing to reconstruct")
    return total


def mix_inputs(quant: list, float_: list, drop_prob: float, fused: bool = False) -> list:
    """QDrop on the unit input: each element comes from the float model with probability drop_prob (in one
    Triton kernel when `fused` and on CUDA)."""
    mixed = []
    for q, f in zip(quant, float_, strict=True):
        if drop_prob > 0 and isinstance(q, torch.Tensor) and q.is_floating_point() and q.shape == f.shape:
            if fused and q.is_cuda:
                from mqsam2.quant.fused import qdrop_mix  # Triton: imported only where it runs

                q = qdrop_mix(q, f, drop_prob)
            else:
                q = torch.where(torch.rand_like(q, dtype=torch.float32) < drop_prob, f, q)
        mixed.append(q)
    return mixed


@torch.no_grad()
def unit_error(unit: Unit, cache: UnitCache, batch_size: int = 8) -> float:
    """The reconstruction loss over every cached sample, quantized inputs, no dropping, in float32: what the
    unit's output error is in deployment (before reconstruction this is round-to-nearest's error)."""
    device = next(unit.module.parameters()).device
    total, count = 0.0, 0
    for group in cache.groups:
        for start in range(0, len(group), batch_size if cache.batchable else 1):
            indices = group[start : start + (batch_size if cache.batchable else 1)]
            batch = cache.batch(indices, device=device).to(device, torch.float32)
            args, kwargs = batch.unflatten(batch.inputs_q)
            outputs, _ = tree_flatten(unit.module(*args, **kwargs))
            loss = reconstruction_loss(outputs, batch.targets, unit.channels_first, require_grad=False)
            total += loss.item() * len(indices)
            count += len(indices)
    return total / count


class UnitReconstruction(L.LightningModule):
    """Minimise the unit's output error under quantization by learning rounding and activation steps.

    `learn_rounding` / `learn_act` / `drop_prob` select QDrop (all), BRECQ's two phases, or AdaRound;
    `extra_groups` adds other learned tensors (optimizer param groups with a `name` and `lr`, cosine-decayed,
    e.g. learnable clipping); `objective` replaces the plain reconstruction loss (e.g. HVQ on video units).
    """

    def __init__(
        self,
        unit: Unit,
        cache: UnitCache,
        max_steps: int,
        learn_rounding: bool = True,
        learn_act: bool = True,
        drop_prob: float = 0.5,
        lr_rounding: float = 1e-3,
        lr_act: float = 4e-5,
        reg_weight: float = 0.01,
        beta: BetaSchedule | None = None,
        seed: int = 0,
        check_finite_every: int = 100,
        compile: bool = False,
        cuda_graphs: bool = False,
        fused_kernels: bool = False,
        extra_groups: Sequence[dict] = (),
        objective: UnitObjective | None = None,
    ):
        super().__init__()
        self.unit_module = unit.module
        self.home_device = next(unit.module.parameters()).device
        # One fused kernel per fake-quant chain instead of ~10 memory passes each (the units are memory-bound).
        self.forward_fn = torch.compile(unit.module, dynamic=True) if compile else unit.module
        self.unit = unit
        self.cache = cache
        self.max_steps = max_steps
        self.learn_rounding = learn_rounding
        self.learn_act = learn_act
        self.drop_prob = drop_prob
        self.lr_rounding = lr_rounding
        self.lr_act = lr_act
        self.reg_weight = reg_weight
        self.beta = beta or BetaSchedule(max_steps)
        self.seed = seed
        self.check_finite_every = check_finite_every
        self.cuda_graphs = cuda_graphs
        self._feeder: BatchFeeder | None = None
        self.batch_size = 1
        self.log_prefix = ""
        for parameter in self.unit_module.parameters():
            parameter.requires_grad_(False)
        self.alphas = (
            [layer.weight_quantizer.alpha for layer in unit.layers.values()] if learn_rounding else []
        )
        self.act_scales = [q.scale for q in unit.act_quantizers.values()] if learn_act else []
        self.extra_groups = list(extra_groups)
        self.objective = objective
        extra = [p for group in self.extra_groups for p in group["params"]]
        for parameter in (*self.alphas, *self.act_scales, *extra):
            parameter.requires_grad_(True)
        # Triton kernels for fake-quant, QDrop and AdaRound on CUDA (mqsam2.quant.fused); eager elsewhere.
        self.fused_kernels = fused_kernels
        for quantizer in self._quantizers():
            quantizer.fused = fused_kernels
        for quantizer in unit.act_quantizers.values():
            quantizer.drop_prob = drop_prob
        # Outside the module tree, so checkpoints look the same with and without graphs. Eager fits hold one too:
        # its clear() in finish() is where every fit's reference cycles are collected.
        self._graphed_steps = GraphedSteps(self.loss_terms, self.unit_module, reg_weight, learn_rounding)

    def _quantizers(self) -> list[nn.Module]:
        return [
            *self.unit.act_quantizers.values(),
            *(layer.weight_quantizer for layer in self.unit.layers.values()),
        ]

    def soft_roundings(self) -> list[torch.Tensor]:
        return [layer.weight_quantizer.soft_rounding() for layer in self.unit.layers.values()]

    def loss_terms(
        self, batch: Batch, beta: float | torch.Tensor | None, indices: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reconstruction loss, rounding regulariser or None) of one batch: the math of a step. With an
        `objective` and the batch's cache `indices`, the first term is that objective."""
        inputs = mix_inputs(batch.inputs_q, batch.inputs_fp, self.drop_prob, self.fused_kernels)
        args, kwargs = batch.unflatten(inputs)
        outputs, _ = tree_flatten(self.forward_fn(*args, **kwargs))
        rec = reconstruction_loss(outputs, batch.targets, self.unit.channels_first)
        if self.objective is not None and indices is not None:
            rec = self.objective(indices, outputs, batch.targets, rec, self.quantized_outputs)
        if not self.learn_rounding or beta is None:
            return rec, None
        if self.fused_kernels and self.device.type == "cuda":
            from mqsam2.quant import fused

            return rec, sum(fused.rounding_regularizer(alpha, beta) for alpha in self.alphas)
        return rec, sum(rounding_regularizer(h, beta) for h in self.soft_roundings())

    def quantized_outputs(self, indices: list[int]) -> list:
        """The unit's flattened outputs on cached samples of one signature, from their quantized inputs."""
        batch = self.cache.batch(indices, device=self.device)
        args, kwargs = batch.unflatten(batch.inputs_q)
        outputs, _ = tree_flatten(self.forward_fn(*args, **kwargs))
        return outputs

    def total_loss(self, rec: torch.Tensor, reg: torch.Tensor | None) -> torch.Tensor:
        return rec if reg is None else rec + self.reg_weight * reg

    @property
    def graphed(self) -> bool:
        """Steps replay CUDA graphs: asked for, the module is on a GPU, and the objective has fixed shapes (an
        `objective` runs other samples, whose signatures vary)."""
        return self.cuda_graphs and self.device.type == "cuda" and self.objective is None

    def training_step(self, batch_index, _):
        step = self.global_step
        torch.manual_seed((self.seed + 7919 * self.global_rank) * 1_000_003 + step)
        indices, batch = self._feeder(step)
        beta = self.beta(step)
        if self.graphed:
            loss, rec, reg = self._graphed_steps.step(self.cache.group_of[indices[0]], batch, beta)
        else:
            rec, reg = self.loss_terms(batch, beta, indices)
            loss = self.total_loss(rec, reg)
        # Logged only where the loggers write: each self.log costs about a millisecond of host time.
        if (step + 1) % self.trainer.log_every_n_steps == 0 or step == self.max_steps - 1:
            self.log(self.log_prefix + "rec_loss", rec.detach().clone(), on_step=True, prog_bar=True)
            if reg is not None:
                self.log(self.log_prefix + "reg", reg.detach().clone(), on_step=True)
        if step % self.check_finite_every == 0 or step == self.max_steps - 1:
            self._check_finite(loss, step)
            if self.learn_rounding:
                h = torch.cat([x.detach().flatten() for x in self.soft_roundings()])
                self.log(self.log_prefix + "hardened_fraction", hardened_fraction(h), on_step=True)
        return loss

    def on_train_start(self) -> None:
        """Start feeding batches to this device, and capture every batch signature's graph before the first
        step (inside the Trainer's precision context, as the steps run), so no step pays for a capture."""
        rank_seed = self.seed + 7919 * self.global_rank
        self._feeder = BatchFeeder(
            self.cache, self.device, lambda step: self.cache.indices(step, self.batch_size, rank_seed)
        )
        if not self.graphed:
            return
        with self.trainer.precision_plugin.forward_context():
            self._graphed_steps.capture(self.cache, self.batch_size, self.device)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        # Graph replays write gradients into static buffers that .grad may alias: never zero them in place.
        optimizer.zero_grad(set_to_none=True)

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            raise self._non_finite(f"its loss ({loss.item()})", step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to write a checkpoint with non-finite learned values, so the last one on disk stays good."""
        bad = [name for name, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise self._non_finite(f"{len(bad)} learned tensor(s) ({bad[0]})", self.global_step)

    def _non_finite(self, what: str, step: int) -> MQSAM2Error:
        return MQSAM2Error(
            f"unit {self.unit.name}: {what} became non-finite by step {step}; the last good checkpoint is kept: "
            "lower reconstruction.lr_act / lr_rounding or check the calibration data, then resume"
        )

    def configure_optimizers(self):
        groups = []
        if self.alphas:
            groups.append({"params": self.alphas, "lr": self.lr_rounding, "name": "rounding"})
        if self.act_scales:
            groups.append({"params": self.act_scales, "lr": self.lr_act, "name": "act_scale"})
        groups.extend(self.extra_groups)
        if not groups:
            raise MQSAM2Error(f"unit {self.unit.name} has nothing to learn in this mode")
        optimizer = torch.optim.Adam(groups, fused=self.device.type == "cuda")

        def cosine(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, self.max_steps) / self.max_steps))

        decays = [(lambda _step: 1.0) if g["name"] == "rounding" else cosine for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decays)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def finish(self) -> None:
        """Harden every rounding variable of every layer in the unit and switch dropping off; the unit goes back
        to the model's device (Lightning's teardown moves the fitted module to the CPU)."""
        self._feeder = None
        self._graphed_steps.clear()
        self.unit_module.to(self.home_device)
        for layer in self.unit.layers.values():
            layer.harden_rounding()
        for quantizer in self.unit.act_quantizers.values():
            quantizer.drop_prob = 0.0
        for quantizer in self._quantizers():
            quantizer.fused = False
        for parameter in self.unit_module.parameters():
            parameter.requires_grad_(False)
