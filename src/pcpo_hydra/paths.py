"""Whether the run can write where its config says, asked before anything heavy.

A folder is tried by creating (and removing) a probe in it, or in the nearest folder that exists
when it does not yet: that also catches what permission bits do not show (a read-only mount, a
file where a folder should be, a full disk, and any path at all for root).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable(folder: Path | str) -> str | None:
    """Why files cannot be created in `folder` (made if missing), as '<reason>: <path>'; None if they can."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"not a folder: {existing}"
    try:
        probe = tempfile.mkdtemp(prefix=".pcpo-write-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as error:
        return f"{error.strerror}: {existing}"
    return None
