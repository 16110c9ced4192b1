"""Third-party warnings that leave a mqsam2 user nothing to do, silenced once per command, each with its reason
(a warning that does call for action is left alone)."""

from __future__ import annotations

import warnings


def silence_known_warnings() -> None:
    """Install the filters; `mqsam2.cli.run_command` calls it for every command."""
    # Lightning suggests prefixing the command with `srun` whenever an srun binary is on PATH and the process is
    # no Slurm task. mqsam2 reads Slurm's and torchrun's variables itself (mqsam2.distributed) and starts the
    # processes of one node through torchrun, so outside Slurm the hint misleads, and it would make every
    # one-line error two lines on a machine where Slurm is installed.
    warnings.filterwarnings(
        "ignore", message=r"The `srun` command is available on your system but is not used"
    )
    # sam2 1.1.0 builds its image transforms with torch.jit.script, which torch deprecates: it still works, and
    # the call is sam2's.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # Lightning 2.6 builds torch's LeafSpec, which torch 2.14 deprecates, in every validation step: the call is
    # Lightning's.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
