"""Where a run's MLflow store is, and whether it can be opened: checked before anything heavy.

No mlflow or torch here (importing mlflow alone takes seconds), so `pcpo-train` can name a locked,
corrupt or unwritable store, or a tracking server that is down, within a second of starting.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from pcpo_hydra.paths import unwritable

DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"  # relative to the working directory
SQLITE_PREFIX = "sqlite:///"
SQLITE_HEADER = b"SQLite format 3\0"
SERVER_PROBE_TIMEOUT_S = 10
# How long another process may hold the store's write lock before the run refuses to start. MLflow's
# own writes hold it for milliseconds; a lock held this long is a stuck or very busy writer.
LOCK_WAIT_S = 2.0
FILE_STORE_GATE = "MLFLOW_ALLOW_FILE_STORE"
SHARED_STORE_FIX = "for jobs logging at the same time use logger=mlflow_server"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI; sqlite paths made absolute.

    An absolute sqlite path keeps the store where it was meant to be even if the working
    directory changes later (Hydra jobs, SLURM).
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    path = sqlite_path(uri)
    if path is None:
        return uri
    query = uri.partition("?")[1:]
    return SQLITE_PREFIX + str(path.resolve()) + "".join(query)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative or absolute), None for other stores."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    path = tracking_uri[len(SQLITE_PREFIX) :].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def is_file_store(tracking_uri: str) -> bool:
    """A `file:` URI or a bare path: MLflow's folder-of-files store."""
    return urlparse(tracking_uri).scheme in ("", "file") and not tracking_uri.startswith("databricks")


def allow_file_store(tracking_uri: str) -> None:
    """Let MLflow 3 open a file store the user named: it refuses one unless $MLFLOW_ALLOW_FILE_STORE is set.

    MLflow's gate is meant for runs that fall into ./mlruns by default; here a file store is only
    ever used when logger.tracking_uri names it. A value the user exported is left as it is.
    """
    if is_file_store(tracking_uri):
        os.environ.setdefault(FILE_STORE_GATE, "true")


def check_server(tracking_uri: str) -> None:
    """Raise ConnectionError when nothing answers at an http(s) tracking URI; other URIs pass.

    Any HTTP answer counts, an error status included: a server behind a proxy may guard /health.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=SERVER_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except OSError as error:
        raise ConnectionError(
            f"no MLflow tracking server answers at {tracking_uri} ({error}). Start one with "
            "`launchers/mlflow_server.sh start` (port: $PCPO_MLFLOW_PORT), or log to sqlite with logger=mlflow"
        ) from error


def store_problem(tracking_uri: str | None) -> str | None:
    """Why the store `logger.tracking_uri` names cannot be opened for writing (one line with the fix), else None."""
    uri = resolve_tracking_uri(tracking_uri)
    key = f"logger.tracking_uri={tracking_uri!r}" + ("" if tracking_uri else f" (store {uri})")
    database = sqlite_path(uri)
    if database is not None:
        problem = sqlite_problem(database)
        return f"{key}: {problem}" if problem else None
    try:
        check_server(uri)
    except ConnectionError as error:
        return f"{key}: {error}"
    return None


def sqlite_problem(database: Path) -> str | None:
    """A sqlite store that cannot be written, is no database, or stays locked for LOCK_WAIT_S; None if usable."""
    fix = "set logger.tracking_uri=sqlite:///<writable folder>/mlflow.db"
    if not database.exists():
        problem = unwritable(database.parent)
        return f"cannot create the store {database} ({problem}); {fix}" if problem else None
    if not database.is_file():
        return f"the store {database} is not a file; {fix}"
    with database.open("rb") as file:
        header = file.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        return f"the store {database} is not an SQLite database (corrupt?); move it aside, or {fix}"
    try:
        connection = sqlite3.connect(f"{database.as_uri()}?mode=rw", uri=True, timeout=LOCK_WAIT_S)
        try:
            connection.execute("BEGIN IMMEDIATE")  # takes the write lock, as MLflow's first write will
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the schema pages
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.OperationalError as error:
        reason = str(error)
        if "locked" in reason:
            return (f"the store {database} stayed locked by another process for {LOCK_WAIT_S:g} s; stop the "
                    f"process holding it (fuser {database}), or {fix} ({SHARED_STORE_FIX})")
        if "readonly" in reason or "unable to open" in reason:
            return f"cannot write the store {database} ({reason}); {fix}, or make the file writable"
        return f"the store {database} cannot be read ({reason}); move it aside, or {fix}"
    except sqlite3.DatabaseError as error:
        return f"the store {database} is corrupt ({error}); move it aside, or {fix}"
    return None
