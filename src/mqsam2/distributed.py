"""Who am I in a multi-process run: torchrun and srun both start the processes; Lightning joins them.

Every stage before reconstruction runs identically on every rank (it is cheap and needs no communication);
reconstruction caches are sharded by rank and Lightning's DDP all-reduces the gradients.
"""

from __future__ import annotations

import os
import sys

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment


def launched_externally() -> bool:
    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def rank_and_world() -> tuple[int, int]:
    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
    elif SLURMEnvironment.detect():
        env = SLURMEnvironment()
    else:
        return 0, 1
    return env.global_rank(), env.world_size()


def local_rank() -> int:
    """This process's index on its node (the GPU it uses): LOCAL_RANK under torchrun, SLURM_LOCALID under srun."""
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment().local_rank()
    if SLURMEnvironment.detect():
        return SLURMEnvironment().local_rank()
    return 0


def processes_per_node() -> int:
    """Processes on this node as the launcher reports them (1 when not launched)."""
    if TorchElasticEnvironment.detect():
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_NTASKS_PER_NODE", os.environ["SLURM_NTASKS"]))
    return 1


def trainer_layout(strategy: str = "auto") -> dict:
    """`devices`, `num_nodes` and `strategy` for a Trainer that joins the processes the launcher started."""
    world = rank_and_world()[1]
    if world == 1:
        return {"devices": 1, "num_nodes": 1, "strategy": strategy}
    per_node = processes_per_node()
    return {
        "devices": per_node,
        "num_nodes": world // per_node,
        "strategy": "ddp" if strategy == "auto" else strategy,
    }


def requested_devices(accelerator: str, devices: int | str) -> int:
    """How many processes a single-node run should use for the Trainer settings in the config."""
    if devices != "auto":
        return int(devices)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def relaunch_with_torchrun(nprocs: int, module: str) -> None:
    """Replace this process by torchrun starting `nprocs` copies of `python -m module <same args>`."""
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nprocs}",
        "-m",
        module,
        *sys.argv[1:],
    ]
    os.execv(sys.executable, args)
