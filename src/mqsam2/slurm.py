"""Slurm preemption: requeue the job when Slurm warns that it is about to stop it.

jobs/reconstruct.slurm asks for `--signal=SIGUSR1@90`: 90 s before the time limit Slurm sends SIGUSR1 to every
task, and the job is requeued; Slurm then stops all tasks and later starts the job again under the same id,
and the fit resumes from its run directory (finished stages and units are loaded, the interrupted unit
continues from its newest checkpoint).

Who answers the warning depends on where the job is. Inside a reconstruction fit, Lightning's own SLURM handler
does: it writes an hpc checkpoint of the unit in progress (so at most the step in flight is lost) and requeues.
Everywhere else (data loading, calibration, unit capture, evaluation), where Lightning has no handler, rank 0
of mqsam2's handler runs `scontrol requeue <job>`. Lightning installs its handler only where none is set, so
`lightning_requeues()` clears ours around each fit and puts it back after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator

from lightning.fabric.plugins.environments import SLURMEnvironment

from mqsam2.distributed import rank_and_world

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1


def job_id() -> str:
    """The id `scontrol requeue` takes: `<array job>_<task>` for array jobs, else SLURM_JOB_ID."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue_job() -> bool:
    """Ask Slurm to requeue this job; Slurm stops its tasks right after. False (logged) when it refuses."""
    command = ["scontrol", "requeue", job_id()]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        log.warning(
            "Slurm is about to stop the job: requeued %s, it resumes from the run directory", job_id()
        )
        return True
    log.error("%s failed (%s): the job will not restart by itself", " ".join(command), result.stderr.strip())
    return False


def _on_warning(signum: int, _frame) -> None:
    if rank_and_world()[0] == 0:
        requeue_job()


def install_requeue_handler() -> bool:
    """Requeue on SIGUSR1 when running under Slurm (True), else leave signals alone (False)."""
    if not SLURMEnvironment.detect():
        return False
    signal.signal(REQUEUE_SIGNAL, _on_warning)
    return True


@contextlib.contextmanager
def lightning_requeues() -> Iterator[None]:
    """Wrap a `trainer.fit`: inside, SIGUSR1 is Lightning's (hpc checkpoint, then requeue); outside, ours."""
    ours = signal.getsignal(REQUEUE_SIGNAL) is _on_warning
    if ours:
        signal.signal(REQUEUE_SIGNAL, signal.SIG_DFL)
    try:
        yield
    finally:
        if ours:
            signal.signal(REQUEUE_SIGNAL, _on_warning)
