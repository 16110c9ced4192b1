"""Slurm: the rank/world wiring under SLURM_* variables and the requeue handler (fast), then a real single-node
cluster that runs jobs/reconstruct.slurm, preempts it twice in the middle of a unit (an operator's
`scontrol requeue`, then the SIGUSR1 time-limit warning, which Lightning answers with an hpc checkpoint) and
compares the resumed run with an uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mqsam2 import slurm
from mqsam2.distributed import local_rank, processes_per_node, rank_and_world, trainer_layout
from mqsam2.reconstruct.driver import newest_checkpoint

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@pytest.fixture
def srun_task(monkeypatch):
    """The environment srun gives task 5 of 8 (4 per node): global rank 5, local rank 1."""
    for name in [*LAUNCHER_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NAME": "mqsam2-fit",
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[01-02]",
    }.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_rank_world_and_local_rank_come_from_slurm(srun_task):
    assert rank_and_world() == (5, 8)
    assert processes_per_node() == 4
    assert local_rank() == 1


def test_trainers_join_the_launched_processes(srun_task):
    """Reconstruction and evaluation Trainers take 2 nodes x 4 devices from srun's 8 tasks, 4 per node."""
    assert trainer_layout() == {"devices": 4, "num_nodes": 2, "strategy": "ddp"}
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        srun_task.delenv(name)
    assert trainer_layout() == {"devices": 1, "num_nodes": 1, "strategy": "auto"}


def test_tasks_per_node_falls_back_to_the_task_count(srun_task):
    srun_task.delenv("SLURM_NTASKS_PER_NODE")
    srun_task.setenv("SLURM_NTASKS", "2")
    assert processes_per_node() == 2


def test_an_interactive_slurm_shell_is_not_a_launch(srun_task):
    srun_task.setenv("SLURM_JOB_NAME", "bash")
    assert rank_and_world() == (0, 1)
    assert processes_per_node() == 1 and local_rank() == 0


def test_torchrun_inside_a_slurm_job_wins(srun_task):
    for name, value in {
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "2",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "3",
        "LOCAL_WORLD_SIZE": "3",
        "GROUP_RANK": "0",
    }.items():
        srun_task.setenv(name, value)
    assert rank_and_world() == (2, 3)
    assert processes_per_node() == 3 and local_rank() == 0


def test_newest_checkpoint_takes_slurms_hpc_checkpoint_when_it_is_newer(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    last, hpc = tmp_path / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"")
    hpc.write_bytes(b"")
    os.utime(last, (1000, 1000))
    os.utime(hpc, (2000, 2000))
    assert newest_checkpoint(tmp_path) == hpc
    os.utime(last, (3000, 3000))
    assert newest_checkpoint(tmp_path) == last


def test_job_id_names_array_tasks(srun_task):
    assert slurm.job_id() == "1234"
    srun_task.setenv("SLURM_ARRAY_JOB_ID", "77")
    srun_task.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm.job_id() == "77_3"


@pytest.fixture
def fake_scontrol(srun_task, tmp_path):
    """An `scontrol` on PATH that records its arguments; the SIGUSR1 handler is restored afterwards."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    srun_task.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    previous = signal.getsignal(slurm.REQUEUE_SIGNAL)
    yield calls
    signal.signal(slurm.REQUEUE_SIGNAL, previous)


def test_rank_zero_requeues_the_job_on_sigusr1(fake_scontrol, srun_task):
    srun_task.setenv("SLURM_PROCID", "0")
    assert slurm.install_requeue_handler()
    os.kill(os.getpid(), slurm.REQUEUE_SIGNAL)
    assert fake_scontrol.read_text() == "requeue 1234\n"


def test_other_ranks_leave_the_requeue_to_rank_zero(fake_scontrol):
    assert slurm.install_requeue_handler()
    os.kill(os.getpid(), slurm.REQUEUE_SIGNAL)
    assert not fake_scontrol.exists()


def test_no_handler_outside_slurm(srun_task):
    srun_task.delenv("SLURM_NTASKS")
    previous = signal.getsignal(slurm.REQUEUE_SIGNAL)
    assert not slurm.install_requeue_handler()
    assert signal.getsignal(slurm.REQUEUE_SIGNAL) is previous


class _SignalsItselfMidFit(L.LightningModule):
    """Sends itself Slurm's time-limit warning during step `at` of a short fit."""

    def __init__(self, at: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.at = at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at:
            os.kill(os.getpid(), slurm.REQUEUE_SIGNAL)
        return (self.weight - 1).square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_inside_a_fit_lightning_writes_its_hpc_checkpoint_and_requeues(fake_scontrol, srun_task, tmp_path):
    """Lightning skips its SLURM handler when one is installed; around a fit, ours steps aside, so the warning
    saves the step in progress (the resumed unit loses at most that step) and requeues; afterwards ours is back."""
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0"}.items():
        srun_task.setenv(name, value)
    srun_task.setenv("SLURM_LOCALID", "0")
    srun_task.setenv("SLURM_NODEID", "0")
    srun_task.setenv("SLURM_NODELIST", "gpu01")
    assert slurm.install_requeue_handler()
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with slurm.lightning_requeues():
        trainer.fit(_SignalsItselfMidFit(at=3), DataLoader(range(5), batch_size=None))
    checkpoint = newest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.name.startswith("hpc_ckpt_")
    assert (
        torch.load(checkpoint, weights_only=False)["global_step"] == 3
    )  # the step in flight, not a lost one
    assert fake_scontrol.read_text() == "requeue 1234\n"
    assert signal.getsignal(slurm.REQUEUE_SIGNAL) is slurm._on_warning


# ---- a real cluster --------------------------------------------------------------------------------------

CONFIG = "configs/slurm_ci.yaml"
RUN_NAME = "slurm-ci"
ITERS = 20  # reconstruction.iters of the test runs (overridden on the command line, with checkpoints every 4)
OPERATOR_CUT = "image_encoder.trunk.blocks.3"  # preempted by `scontrol requeue` while this unit runs
WARNING_CUT = (
    "image_encoder.trunk.blocks.8"  # preempted by the SIGUSR1 time-limit warning while this one runs
)
TIMEOUT = 900


def _run(env: dict, *command: str) -> str:
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _job(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge = 1 h)."""
    fields = _run(env, "scontrol", "show", "job", "-o", job).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def _submit(env: dict, tmp_path: Path, name: str) -> str:
    job_env = env | {
        "CONFIG": CONFIG,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO / "src"),
        "WANDB_MODE": "offline",
        "TQDM_DISABLE": "1",
    }
    return _run(
        job_env,
        "sbatch",
        "--parsable",
        f"--chdir={REPO}",
        "--partition=cpu",
        "--gpus-per-node=0",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=00:30:00",
        f"--job-name=mqsam2-ci-{name}",
        f"--output={tmp_path / name}.out",
        str(REPO / "jobs" / "reconstruct.slurm"),
        f"--run_root={tmp_path / name}",
        f"--data.root={tmp_path / 'synth'}",
        f"--reconstruction.iters={ITERS}",
        "--reconstruction.checkpoint_every=4",
    )


def _wait(condition, what: str, env: dict, jobs: dict[str, Path]) -> None:
    """Poll `condition` every 50 ms (job states every second); fail with the job's log when a job ends badly
    or time runs out."""
    deadline = time.monotonic() + TIMEOUT
    for tick in range(sys.maxsize):
        if condition():
            return
        for job, log in jobs.items() if tick % 20 == 0 else ():
            state = _job(env, job)["JobState"]
            if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                pytest.fail(f"job {job} ended {state} while waiting for {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {TIMEOUT} s waiting for {what}")
        time.sleep(0.05)


def _unit_running(run_dir: Path, unit: str) -> bool:
    """The unit has written a mid-fit checkpoint and is not finished."""
    unit_dir = run_dir / "units" / unit
    return (unit_dir / "qdrop" / "last.ckpt").exists() and not (unit_dir / "qdrop.pt").exists()


def _release(env: dict, job: str, jobs: dict[str, Path]) -> None:
    """Wait for the requeued job to be pending again, then let it start now: Slurm holds a job that was
    requeued while suspended, and delays any requeued job's start (BeginTime) by about two minutes."""
    _wait(lambda: _job(env, job)["JobState"] == "PENDING", f"job {job} to be requeued", env, jobs)
    _run(env, "scontrol", "release", job)
    _run(env, "scontrol", "update", f"JobId={job}", "StartTime=now")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "units.jsonl").read_text().splitlines()]


@pytest.mark.slurm
def test_preempted_job_resumes_mid_unit_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    env = slurm_cluster
    straight, preempted = _submit(env, tmp_path, "straight"), _submit(env, tmp_path, "preempted")
    logs = {straight: tmp_path / "straight.out", preempted: tmp_path / "preempted.out"}
    run_dir, reference = tmp_path / "preempted" / RUN_NAME, tmp_path / "straight" / RUN_NAME

    # An operator requeues the job while OPERATOR_CUT runs: freeze it, confirm the unit is mid-fit, requeue.
    _wait(lambda: _unit_running(run_dir, OPERATOR_CUT), f"{OPERATOR_CUT} to be mid-fit", env, logs)
    _run(env, "scontrol", "suspend", preempted)
    assert _unit_running(run_dir, OPERATOR_CUT), "the unit finished before the job was suspended"
    _run(env, "scontrol", "requeue", preempted)
    _release(env, preempted, logs)

    # The time-limit warning (#SBATCH --signal=SIGUSR1@90) reaches the tasks while WARNING_CUT runs.
    _wait(lambda: _unit_running(run_dir, WARNING_CUT), f"{WARNING_CUT} to be mid-fit", env, logs)
    _run(env, "scancel", "--signal=USR1", preempted)
    _release(env, preempted, logs)

    _wait(
        lambda: all(_job(env, j)["JobState"] == "COMPLETED" for j in logs), "both jobs to finish", env, logs
    )
    log = logs[preempted].read_text()
    assert _job(env, preempted)["Restarts"] == "2"
    assert [f"start {n}" in log for n in (1, 2, 3)] == [True] * 3

    # Every unit finished exactly once, in order: none was re-run after a restart.
    records, expected = _records(run_dir), _records(reference)
    assert [r["unit"] for r in records] == [r["unit"] for r in expected]
    assert len(records) == len({r["unit"] for r in records}) == 25

    # The interrupted units resumed in a second attempt, no other unit restarted: the operator's requeue from
    # the last periodic checkpoint, the warning from the hpc checkpoint Lightning's handler wrote mid-fit, which
    # loses at most the step in flight (attempt0 logs every step, so its last logged step is the last done).
    resumed = dict(re.findall(r"qdrop: resuming from (last|hpc_ckpt_\d+)\.ckpt \(step (\d+)\)", log))
    assert set(resumed) == {"last", "hpc_ckpt_1"}, resumed
    for record in records:
        attempts = sorted(p.name for p in (run_dir / "units" / record["unit"] / "qdrop" / "logs").iterdir())
        if record["unit"] in (OPERATOR_CUT, WARNING_CUT):
            start = int(resumed["last" if record["unit"] == OPERATOR_CUT else "hpc_ckpt_1"])
            assert attempts == ["attempt0", "attempt1"], record["unit"]
            assert 0 < record["steps_this_run"] == ITERS - start, record["unit"]
        else:
            assert attempts == ["attempt0"] and record["steps_this_run"] == ITERS, record["unit"]
    first_attempt = run_dir / "units" / WARNING_CUT / "qdrop" / "logs" / "attempt0" / "metrics.csv"
    done = max(int(row["step"]) for row in csv.DictReader(first_attempt.open()))
    assert int(resumed["hpc_ckpt_1"]) >= done, "the warning lost more than the step in flight"

    # Same result as the uninterrupted run: every unit's final state, and the deployable export, bit for bit.
    for record in records:
        ours = torch.load(run_dir / "units" / record["unit"] / "qdrop.pt", weights_only=True)
        theirs = torch.load(reference / "units" / record["unit"] / "qdrop.pt", weights_only=True)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), record["unit"]
    assert (run_dir / "export" / "model.mq").read_bytes() == (reference / "export" / "model.mq").read_bytes()

    # One W&B run across the three starts: every offline run directory carries the stored id.
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 3 and all(p.name.endswith(f"-{run_id}") for p in offline_runs)
