"""`python -m mqsam2.fit --config configs/<name>.yaml [--section.key value ...] [--print_config]`

Runs the whole Mix-QSAM2 pipeline, or with a `recipe` section a registered method as a compare row runs it,
into runs/<name>/ and resumes it when restarted. Several GPUs on one node
are used through torchrun (started automatically); under srun or torchrun the launcher's processes are used.
The config, the checkpoint, the unit names and the data are checked before anything is written to the run
directory; failures are one line and an exit status (`mqsam2.cli`: 2 bad input, 130/143 stopped, resumable).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import TYPE_CHECKING

from mqsam2.cli import run_command
from mqsam2.config import FitConfig, parse_config
from mqsam2.distributed import launched_externally, rank_and_world, relaunch_with_torchrun, requested_devices
from mqsam2.files import write_text
from mqsam2.slurm import install_requeue_handler
from mqsam2.stages import StageTimes, charged, summary

if TYPE_CHECKING:
    from mqsam2.rundir import RunDir

log = logging.getLogger("mqsam2")


def setup_logging() -> None:
    rank = rank_and_world()[0]
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s mqsam2 | %(message)s"
        if rank == 0
        else f"%(asctime)s mqsam2[rank {rank}] | %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def wandb_logger(config: FitConfig, run: RunDir):
    """One W&B run per run directory (its id is kept there, so restarts and requeues continue it); offline
    unless an API key is configured. Rank 0 alone logs, so only it needs the run (and the id file)."""
    if not config.logging.wandb or os.environ.get("WANDB_MODE") == "disabled" or rank_and_world()[0] != 0:
        return None
    from lightning.pytorch.loggers import WandbLogger

    id_file = run.wandb_id
    if not id_file.exists():
        write_text(id_file, uuid.uuid4().hex[:12])
    online = bool(os.environ.get("WANDB_API_KEY")) or os.environ.get("WANDB_MODE") == "online"
    logger = WandbLogger(
        project=config.logging.project,
        entity=config.logging.entity,
        name=config.name,
        id=id_file.read_text().strip(),
        save_dir=str(run.path),
        offline=not online,
        resume="allow",
    )
    # Lightning 2.6 always passes `anonymous` to wandb.init, which wandb warns has no effect: leave it unset
    logger._wandb_init.pop("anonymous", None)
    return logger


def run(config: FitConfig) -> dict:
    from mqsam2 import pipeline

    times = StageTimes()
    with charged(times, "model and data"):
        float_model = pipeline.load_float_model(config)
        pipeline.check_units(float_model, config)
        data = pipeline.load_data(config, float_model.image_size)
    run_dir = pipeline.prepare_run_dir(config)  # nothing is written before this point
    wandb = wandb_logger(config, run_dir)
    loggers = [wandb] if wandb else []
    if config.recipe.method is not None:
        with charged(times, "recipe"):
            model = pipeline.stage_recipe(float_model, config, data.calibration, run_dir, loggers)
    else:
        with charged(times, "importance"):
            importance = pipeline.stage_importance(float_model, config, data.calibration, run_dir)
        with charged(times, "allocation"):
            plan = pipeline.stage_allocation(importance, config, run_dir, loggers)
        with charged(times, "quantize"):
            model = pipeline.stage_quantize(float_model, plan, config, data.calibration, run_dir)
        with charged(times, "reconstruct"):
            pipeline.stage_reconstruct(model, float_model, config, data.calibration, run_dir, loggers)
    report = pipeline.summary(run_dir)
    with charged(times, "evaluate"):
        report["evaluation"] = pipeline.stage_evaluate(model, float_model, config, data, run_dir, loggers)
    if config.export:
        with charged(times, "export"):
            report["export"] = pipeline.stage_export(model, config, run_dir)
    report["seconds"] = {name: round(seconds, 1) for name, seconds in times.seconds.items()}
    log.info("done in %.1f s (%s): %s", sum(times.seconds.values()), summary(times), run_dir.path)
    for label, path in run_dir.results():
        log.info("  %-11s %s", label, path)
    return report


def _fit(argv: list[str] | None) -> None:
    config = parse_config(argv)
    recon = config.reconstruction
    nprocs = requested_devices(recon.accelerator, recon.devices)
    if nprocs > 1 and not launched_externally():
        relaunch_with_torchrun(nprocs, "mqsam2.fit")
    setup_logging()
    install_requeue_handler()
    run(config)


def main(argv: list[str] | None = None) -> int:
    return run_command(
        lambda: _fit(argv), on_stop="the run is unfinished; rerun the same command to resume it"
    )


if __name__ == "__main__":
    sys.exit(main())
