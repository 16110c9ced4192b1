"""mqsam2's commands as real processes, cheaply.

A forkserver imports mqsam2 once; each command is a fresh process forked from it that runs the command's
module exactly as `python -m` does (runpy runs it as `__main__`, whose `main()` reads `sys.argv`: no argv is
handed to it, so the tests take the path a user's command line takes), with its own working directory,
environment, stdout/stderr files, exit status and signal handlers, so importing torch and Lightning (tens of
seconds on a busy 2-core machine) is paid once per test session instead of once per case.

A `Fault` sends the process a real signal at an exact point: on the n-th call of a named function, before or
after it runs. Functions are patched where the caller looks them up (e.g. `mqsam2.reconstruct.driver:save_torch`
for the driver's calls), methods on their class (`mqsam2.rundir:RunDir.write_unit_log`).
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import resource
import runpy
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = {
    "fit": "mqsam2.fit",
    "compare": "mqsam2.compare",
    "export": "mqsam2.export",
    "deploy": "mqsam2.deploy",
    "data": "mqsam2.data",
}
PRELOAD = [
    "mqsam2.fit",
    "mqsam2.compare",
    "mqsam2.export.__main__",
    "mqsam2.deploy.__main__",
    "mqsam2.data.__main__",
]
OUR_LINES = ("error:", "stopped by", "internal error:")


@dataclass(frozen=True)
class Fault:
    target: str  # "package.module:function" or "package.module:Class.method"
    signum: int
    call: int = 1  # the n-th call
    before: bool = True  # signal before the call runs (else right after it returns)


@dataclass
class Result:
    status: int  # the exit status; -N when signal N killed the process
    stdout: str
    stderr: str
    argv: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[str]:
        """The lines the command's error boundary printed (errors, stops, internal errors)."""
        return [line for line in self.stderr.splitlines() if line.startswith(OUR_LINES)]

    def one_line(self) -> str:
        """The single boundary line, checked to be the last line of stderr and to follow no traceback."""
        assert len(self.messages) == 1, self.describe()
        assert self.stderr.rstrip().splitlines()[-1] == self.messages[0], self.describe()
        assert "Traceback" not in self.stderr, self.describe()
        return self.messages[0]

    def describe(self) -> str:
        return f"{self.argv} -> {self.status}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def _arm(fault: Fault) -> None:
    module_name, _, attribute = fault.target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def patched(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == fault.call and fault.before:
            os.kill(os.getpid(), fault.signum)
        result = original(*args, **kwargs)
        if calls == fault.call and not fault.before:
            os.kill(os.getpid(), fault.signum)
        return result

    setattr(owner, name, patched)


def _child(
    module: str,
    argv: list[str],
    cwd: str,
    env: dict,
    out: str,
    err: str,
    fault: Fault | None,
    fsize: int | None,
) -> None:
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(cwd)
    os.environ.update(env)
    for sig in (signal.SIGINT, signal.SIGTERM):  # as a fresh interpreter has them
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    if fault is not None:
        _arm(fault)
    if fsize is not None:  # writes past it fail with EFBIG, as they would with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    # the forkserver imported the module already; `python -m` would import it only as __main__
    warnings.filterwarnings(
        "ignore", message=r".*found in sys\.modules after import of package", category=RuntimeWarning
    )
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class Runner:
    """Starts commands from a forkserver that has imported mqsam2 (see the module docstring)."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = Path(workdir)
        self.env = env
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.count = 0

    def __call__(
        self,
        command: str,
        *argv: str,
        fault: Fault | None = None,
        file_size_limit: int | None = None,
        timeout: float = 600,
    ) -> Result:
        """Run `command argv` to its end; `file_size_limit` (bytes) caps every file it writes."""
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        process = self.context.Process(
            target=_child,
            args=(
                COMMANDS[command],
                list(argv),
                str(Path.cwd()),
                self.env,
                str(out),
                str(err),
                fault,
                file_size_limit,
            ),
        )
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise TimeoutError(f"{command} {argv} ran past {timeout} s")
        return Result(process.exitcode, out.read_text(), err.read_text(), [command, *argv])
