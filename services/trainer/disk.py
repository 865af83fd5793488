"""Writing the trainer's files to a disk that may be full or failing: one clear error, and a space check first.

A publish or a checkpoint that cannot be written (ENOSPC, EIO, EDQUOT, ...)
reaches the trainer as one exception, a `WriteFailed` (an OSError, with the
errno kept), whose message says what was being written, why in plain words
and under which directory, so the loop can stop with one line. The errno is
dug out of whatever the writer raised: an OSError, safetensors' Rust error
("... (os error 28)") or torch.distributed.checkpoint's CheckpointException,
which carries every rank's exception. With several ranks, `agree_on_write`
makes a failure on one rank an error on all of them, so none waits for a
rank that has given up.
"""

from __future__ import annotations

import errno as errnos
import os
import re
import shutil
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from e3.train.parallel import Topology, max_over_ranks

# What a writer may raise; CheckpointException is a BaseException, not an Exception.
WRITE_ERRORS = (Exception, CheckpointException)

_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


class WriteFailed(OSError):
    """Files under `directory` could not be written; `errno` says why when the system said so."""

    def __init__(self, what: str, directory: Path | str, errno: int | None = None, detail: str = "") -> None:
        super().__init__(errno, os.strerror(errno) if errno else detail, str(directory))
        self.what, self.directory, self.detail = what, Path(directory), detail

    def __str__(self) -> str:
        if not self.errno:
            return f"{self.what} under {self.directory} failed: {self.detail}"
        reason = os.strerror(self.errno)
        message = f"{self.what} failed: {reason[:1].lower()}{reason[1:]} under {self.directory}"
        return f"{message} ({self.detail})" if self.detail else message

    @classmethod
    def of(cls, what: str, directory: Path, exc: BaseException, detail: str = "") -> WriteFailed:
        """The error for `exc`, raised while writing `what` under `directory`."""
        code = errno_of(exc)
        if code is None:
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
        error = cls(what, directory, code, detail)
        error.__cause__ = exc  # raised later, outside the except block, it still shows what the writer said
        return error


def errno_of(exc: BaseException | None) -> int | None:
    """The errno behind `exc`: its own, a wrapped one, or one its message quotes; None if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        if isinstance(exc, CheckpointException):
            for failure in exc.failures.values():
                code = errno_of(failure[0] if isinstance(failure, tuple) else failure)
                if code is not None:
                    return code
        match = _ERRNO_IN_TEXT.search(str(exc)) if not isinstance(exc, CheckpointException) else None
        if match:
            return int(match.group(1) or match.group(2))
        exc = exc.__cause__ or exc.__context__
    return None


def agree_on_write(topology: Topology, error_type: type[WriteFailed], what: str, directory: Path, action,
                   clean_up=None):
    """`action()` on this rank (None: nothing to do here), then the ranks agree on how it went; a collective.

    If it failed on any rank, rank 0 calls `clean_up(error)` and every rank
    raises `error_type`: the failing rank its own error, the others one that
    names the failing rank and its errno. Otherwise `action`'s result.
    """
    result = error = None
    try:
        result = action() if action is not None else None
    except WRITE_ERRORS as exc:
        error = exc if isinstance(exc, error_type) else error_type.of(what, directory, exc)
    failed_rank, code = max_over_ranks([topology.rank if error else -1, (error.errno or 0) if error else 0], topology)
    if failed_rank < 0:
        return result
    error = error or error_type(what, directory, int(code) or None, f"on rank {int(failed_rank)}")
    if topology.is_main and clean_up is not None:
        clean_up(error)
    raise error


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def ensure_space(error: type[WriteFailed], what: str, directory: Path, needed: int) -> None:
    """Raise `error` (ENOSPC) if `needed` bytes will not fit under `directory`."""
    free = free_bytes(directory)
    if needed > free:
        raise error(what, directory, errnos.ENOSPC, f"needs at least {_size(needed)}, {_size(free)} free")


def remove_tree(path: Path, error: WriteFailed | None = None) -> None:
    """Remove `path` if it is there; if it cannot be, `error` (about to be raised) says so."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists() and error is not None:
        error.detail = "; ".join(filter(None, [error.detail, f"{path} is left behind"]))


def _size(count: int) -> str:
    if count < 1000:
        return f"{count} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        count /= 1000
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"
