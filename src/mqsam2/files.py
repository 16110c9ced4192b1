"""Every file mqsam2 writes is written atomically, and every torch file it reads is read with a clear error.

A write goes to a hidden temporary next to the target (`.<name>.tmp`) and is renamed onto it once complete, so
a crash, a kill or a full disk leaves the target as it was: the previous version, or nothing. A failed write
removes its temporary; after a SIGKILL, the stale temporary is simply overwritten by the next attempt. Renames
are atomic against process death; they are not fsync'ed, so a power loss may still lose the latest version.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from mqsam2.errors import MQSAM2Error

TMP_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """An open file that becomes `path` only when the block completes. An OSError names `path` (not the
    temporary), so the CLI can say which artifact could not be written."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        make_folder(path.parent)
        with open(tmp, mode) as stream:
            yield stream
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        _remove(tmp)
        raise


def make_folder(folder: Path) -> None:
    """`mkdir -p`, where a file in the way is ENOTDIR naming the folder (mkdir says EEXIST)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file stands where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. its folder could not be made in the first place
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_output(path, "w") as stream:
        stream.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    with atomic_output(path, "wb") as stream:
        stream.write(data)
    return Path(path)


class _KeepsWriteErrors:
    """A file wrapper for torch.save, which reports a failed write as an opaque RuntimeError ("unexpected
    pos"): it keeps the OSError (disk full, file too large) so the caller can raise that instead."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.stream.flush()


def save_torch(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)`, atomically."""
    with atomic_output(path, "wb") as stream:
        sink = _KeepsWriteErrors(stream)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
    return Path(path)


def load_torch(path: str | Path, what: str, fix: str, weights_only: bool = True) -> Any:
    """`torch.load` on the CPU; a missing, damaged or foreign file is an MQSAM2Error naming `what` it should
    be and the `fix`, instead of torch's multi-line unpickling advice."""
    path = Path(path)
    if not path.is_file():
        raise MQSAM2Error(f"{what} not found: {path}; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except OSError:
        raise
    except Exception as exc:
        raise MQSAM2Error(
            f"cannot read {what} {path}: damaged or not a PyTorch file ({type(exc).__name__}); {fix}"
        ) from None
