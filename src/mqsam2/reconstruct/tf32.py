"""TF32 for the float32 work of a reduced-precision reconstruction fit: under bf16 autocast the quantizers'
arithmetic, the rounding regulariser and the loss stay in float32, and on Hopper IEEE float32 matmuls run at
a fraction of TF32's rate. A `32-true` fit keeps IEEE float32, so fp32 rows stay the exact reference."""

from __future__ import annotations

import lightning as L
import torch

FULL_PRECISIONS = ("32-true", "64-true", "32", "64")


class TensorFloat32(L.Callback):
    """Float32 matmuls at TF32 ("high") while a fit with a reduced `precision` runs, restored when it ends."""

    def __init__(self) -> None:
        self.before = torch.get_float32_matmul_precision()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.before = torch.get_float32_matmul_precision()
        if str(trainer.precision) not in FULL_PRECISIONS:
            torch.set_float32_matmul_precision("high")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_float32_matmul_precision(self.before)
