"""A reduced-precision reconstruction fit runs its float32 matmuls at TF32, a 32-true fit at IEEE float32, and
the process's setting is back as it was after either (read from torch's own state inside the steps)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mqsam2.reconstruct.tf32 import TensorFloat32


class Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.seen: set[str] = set()

    def training_step(self, batch, batch_idx):
        self.seen.add(torch.get_float32_matmul_precision())
        return self.layer(torch.ones(2, 4)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("precision", "inside"), [("bf16-mixed", "high"), ("32-true", "highest")])
def test_matmul_precision_follows_the_fits_precision_and_is_restored(precision, inside):
    assert torch.get_float32_matmul_precision() == "highest"
    probe = Probe()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        precision=precision,
        callbacks=[TensorFloat32()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, torch.utils.data.DataLoader(range(2), batch_size=None))
    assert probe.seen == {inside}
    assert torch.get_float32_matmul_precision() == "highest"
