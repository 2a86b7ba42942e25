"""One process trains in a run directory at a time: an exclusive lock held for the whole run.

Two `pcpo-train resume=<dir>` at once would both continue the same checkpoint into the same MLflow
run, logging every later epoch twice. The lock is an flock on <run dir>/.pcpo.lock: the kernel
drops it when its holder exits, however it exits (kill -9 included), so a lock is never stale.
The holder writes its pid into the file, for the message the next one gets.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".pcpo.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


def launcher_rank() -> int:
    """This process's rank when a launcher (torchrun, a submitit job) started the ranks, else 0.

    Only rank 0 takes the lock; the ranks of one run share the directory.
    """
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if os.environ.get("SUBMITIT_EXECUTOR") else None)
    return int(rank or 0)


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` exclusively while inside; RunDirBusy at once, naming the holder, if another process does."""
    if launcher_rank() != 0:
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RunDirBusy(
                f"run directory {run_dir} is in use by pcpo-train pid {holder}; wait for it to end "
                f"(or stop it: kill {holder}), then run this again"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield
