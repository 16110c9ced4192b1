"""The error boundary every command shares (mqsam2.cli): which failure gives which status and which one line.
The commands themselves are exercised end to end in tests/test_reliability.py; here each kind of failure is
raised directly, including the disk and permission errors a test machine cannot easily produce for real."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from mqsam2.cli import Stopped, run_command
from mqsam2.errors import MQSAM2Error


def _raise(exc: BaseException):
    def body():
        raise exc

    return body


@pytest.mark.parametrize(
    "exc,status,line",
    [
        (MQSAM2Error("bad thing; do this"), 2, "error: bad thing; do this"),
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/calibrated.pt"),
            2,
            "error: cannot use runs/x/calibrated.pt: no space left on the device; free space or choose another location",
        ),
        (
            OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/runs"),
            2,
            "error: cannot use /ro/runs: read-only file system; choose a writable location",
        ),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/root/runs"),
            2,
            "error: cannot use /root/runs: permission denied; fix the permissions or choose another location",
        ),
        (
            RuntimeError("value cannot be converted to type float without overflow"),
            2,
            "error: numerical overflow (value cannot be converted to type float without overflow): values too large "
            "for their number format; lower the learning rates or check the inputs",
        ),
        (Stopped(signal.SIGTERM), 143, "stopped by SIGTERM: resume"),
        (KeyboardInterrupt(), 130, "stopped by SIGINT: resume"),
    ],
    ids=["user error", "disk full", "read-only", "permission", "overflow", "SIGTERM", "Ctrl-C"],
)
def test_known_failures_are_one_line_with_their_status(capsys, exc, status, line):
    assert run_command(_raise(exc), on_stop="resume") == status
    assert capsys.readouterr().err.splitlines() == [line]


def test_an_internal_error_prints_its_traceback_then_one_line(capsys):
    assert run_command(_raise(ValueError("oops")), on_stop="resume") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == "internal error: ValueError: oops (a bug: please report it with the traceback above)"


def test_a_real_signal_stops_the_body_and_an_exit_without_a_code_is_not_success(capsys):
    """Lightning answers SIGTERM in a fit with SystemExit and no code (status 0): after a stop signal that
    must still be a stop. The handlers are restored afterwards."""
    previous = signal.getsignal(signal.SIGTERM)

    def lightning_like():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Stopped:
            raise SystemExit from None

    assert run_command(lightning_like, on_stop="resume") == 143
    assert capsys.readouterr().err.splitlines() == ["stopped by SIGTERM: resume"]
    assert signal.getsignal(signal.SIGTERM) is previous
