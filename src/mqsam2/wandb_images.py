"""Pictures people look at (allocation chart, loss curves, overlays) go to W&B when a WandbLogger is active."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger


def log_images(
    loggers: Sequence[Logger], key: str, paths: Sequence[Path | str], step: int | None = None
) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [str(p) for p in paths], step=step)
