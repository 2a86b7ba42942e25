"""Writes that fail for want of disk (full, quota, `ulimit -f`, read-only): one line, nothing half-written.

Libraries report such a failure each their own way: an OSError with its errno, safetensors as
"os error 27" in its message, torch as "unexpected pos ..." with no errno at all, sqlite as
"disk I/O error". `written(path)` turns all of them into a WriteFailed naming the path and the
reason, after removing what was half written; `pcpo-train` prints it on one line.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
# How libraries that drop the errno word a short or failed write (torch, sqlite, safetensors).
_WRITE_FAILURE_TEXT = re.compile(r"I/O error|disk is full|No space|File too large|write failed|unexpected pos")
LOW_SPACE_BYTES = 1 << 20  # less free space than this on the path's disk: the write failed for want of it


class WriteFailed(OSError):
    """The run could not write `path` for want of disk; str() is the one line to show."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path


@contextmanager
def written(path: Path | str, remove: bool = True) -> Iterator[None]:
    """Run a block that writes `path` (a file or a folder): on failure remove it (if `remove`),
    and raise WriteFailed when the cause was the disk, else the original error."""
    path = Path(path)
    try:
        yield
    except WriteFailed:
        raise
    except Exception as error:
        if remove:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        reason = disk_reason(error, path)
        if reason is None:
            raise
        named = next((link.filename for link in _chain(error) if isinstance(link, OSError) and link.filename), None)
        raise WriteFailed(Path(named) if named else path, reason + (" (removed)" if remove else "")) from error


def _chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or while handling, innermost last."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def disk_reason(error: BaseException, path: Path) -> str | None:
    """Why writing `path` failed, if for want of disk: the errno's words, found in the error or, where a
    library dropped it, in the state of the disk and of `ulimit -f`; None for any other failure."""
    chain = _chain(error)
    for link in chain:
        codes = [link.errno] if isinstance(link, OSError) and link.errno else []
        codes += [int(a or b) for a, b in _ERRNO_IN_TEXT.findall(str(link))]
        for code in codes:
            if code in DISK_ERRNOS:
                return _explained(code)
    if not any(_WRITE_FAILURE_TEXT.search(str(link)) for link in chain):
        return None
    if _free_bytes(path) < LOW_SPACE_BYTES:
        return _explained(errno.ENOSPC)
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return _explained(errno.EFBIG)
    return f"I/O error ({str(chain[0]).splitlines()[0][:200]})"


def _explained(code: int) -> str:
    """The errno's words; for EFBIG also the file-size limit that caused it."""
    words = os.strerror(code)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG and limit != resource.RLIM_INFINITY:
        words += f" (the file-size limit, ulimit -f, is {limit} bytes)"
    elif code == errno.ENOSPC:
        words += " (free some space on that disk)"
    return words


def _free_bytes(path: Path) -> int:
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize
