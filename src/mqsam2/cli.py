"""The one error boundary of every mqsam2 command (fit, export, data): a known failure becomes one line on stderr
naming the problem and the fix, and the exit status says what happened, so wrappers and schedulers can trust it.

    0        finished
    1        internal error (a bug): the traceback, then one line
    2        bad input (command line, config, checkpoint, data, a numerical blow-up the settings caused) or a
             file that cannot be written (permissions, read-only or full disk); nothing is left half-written
    128 + N  stopped by signal N (130 SIGINT, 143 SIGTERM): the work is unfinished, never reported as success;
             rerunning the same command resumes it

SIGINT and SIGTERM raise `Stopped` wherever the process is, also inside a Lightning fit (Lightning chains its
own SIGTERM handler in front of ours), so the stack unwinds, atomic writes drop their temporaries and the line
is printed instead of a traceback.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import traceback
from collections.abc import Callable

from mqsam2.errors import MQSAM2Error
from mqsam2.quiet import silence_known_warnings

EXIT_INTERNAL, EXIT_USER = 1, 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_OS_ERRORS = {
    errno.EACCES: ("permission denied", "fix the permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.ENOSPC: ("no space left on the device", "free space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another location"),
    errno.EFBIG: ("file too large (disk or file-size limit)", "free space or raise the limit"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "check the path"),
}


_received: list[int] = []  # stop signals received during the current command, newest last


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so `except Exception` does not eat it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    _received.append(signum)
    raise Stopped(signum)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose command-line errors are one line (the usage is what --help is for)."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"error: {message} (see {self.prog} --help)\n")


def count(least: int = 1) -> Callable[[str], int]:
    """An argparse type for a count: an integer of at least `least`; argparse names the option when not."""

    wanted = "a positive integer" if least == 1 else f"an integer of at least {least}"

    def parse(text: str) -> int:
        value = int(text) if text.strip().lstrip("+-").isdigit() else None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    return parse


def describe_os_error(exc: OSError) -> str:
    """An OSError as "cannot use <file>: <reason>; <fix>"."""
    reason, fix = _OS_ERRORS.get(exc.errno, (exc.strerror or str(exc), "check the path and the disk"))
    where = f"cannot use {exc.filename}" if exc.filename else "input/output failed"
    return f"{where}: {reason}; {fix}"


def run_command(body: Callable[[], object], on_stop: str) -> int:
    """Run a command's `body` inside the boundary and return its exit status (see the module docstring).
    `on_stop` tells the user what a stop left behind, e.g. how to resume."""
    _received.clear()
    silence_known_warnings()
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        body()
        return 0
    except (Stopped, KeyboardInterrupt) as stop:
        return _stopped(getattr(stop, "signum", signal.SIGINT), on_stop)
    except SystemExit as exc:
        if exc.code in (None, 0) and _received:  # e.g. Lightning's SIGTERMException: a stop, not a success
            return _stopped(_received[-1], on_stop)
        raise
    except MQSAM2Error as exc:
        _say(f"error: {exc}")
        return EXIT_USER
    except OSError as exc:
        _say(f"error: {describe_os_error(exc)}")
        return EXIT_USER
    except (OverflowError, RuntimeError) as exc:
        if not isinstance(exc, OverflowError) and "overflow" not in str(exc):
            return _internal(exc)
        _say(
            f"error: numerical overflow ({_first_line(exc)}): values too large for their number format; "
            "lower the learning rates or check the inputs"
        )
        return EXIT_USER
    except Exception as exc:
        return _internal(exc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int, on_stop: str) -> int:
    _say(f"stopped by {signal.Signals(signum).name}: {on_stop}")
    return 128 + signum


def _internal(exc: Exception) -> int:
    traceback.print_exc()
    _say(
        f"internal error: {type(exc).__name__}: {_first_line(exc)} (a bug: please report it with the "
        "traceback above)"
    )
    return EXIT_INTERNAL


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _say(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
