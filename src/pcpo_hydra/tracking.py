"""MLflow tracking for one training run: params, tags, metrics, sample grids, artifacts, resume.

Only the main process builds a tracker. It talks to MLflow through an `MlflowClient` with an
explicit run id rather than MLflow's global active run, so several runs in one process (tests,
a sweep's jobs) never log into each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from torch import Tensor

from pcpo_hydra.image_grid import make_grid
from pcpo_hydra.mlflow_store import allow_file_store, check_server, resolve_tracking_uri, sqlite_path
from pcpo_hydra.writes import written

ARTIFACTS_DIR = "mlartifacts"  # next to a sqlite file: where its new experiments keep artifacts
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow's mark of a model-training experiment. MLflow 3.17's UI does not open its view by it: it
# follows the browser's GenAI | Model training sidebar switch (README, "Browsing runs in MLflow").
EXPERIMENT_KIND = "custom_model_development"
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
PID_TAG, HOST_TAG = "pcpo.pid", "pcpo.host"  # the process logging a run, so a later start can tell it died
STALE_TAG = "pcpo.closed_stale"  # why a later start ended a run left RUNNING
RESUME_TAG = re.compile(r"resume_(\d+)_overrides")

# MLflow's own limits (mlflow.utils.validation): longer values or larger batches are rejected.
PARAM_VALUE_MAX = 6000
TAG_VALUE_MAX = 8000
PARAMS_TAGS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TRUNCATED = "...[truncated]"

LOCK_RETRIES = 5  # a sqlite store shared by a sweep's jobs is briefly locked while one writes
LOCK_BACKOFF_S = 0.5

T = TypeVar("T")
log = logging.getLogger(__name__)


def flatten_config(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.lora.rank": "4", ...}; lists and empty mappings as JSON.

    MLflow params are flat strings; dotted keys read like the Hydra overrides that set them.
    """
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (Mapping, list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str | None:
    """HEAD of the checkout holding this package, else of the working directory; None if neither.

    Only a tag on the run: it must never stop training, so every failure gives None.
    """
    for where in (Path(__file__).resolve().parent, None):  # None: the working directory
        try:
            result = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if result.returncode == 0:
            return result.stdout.strip()
    return None


def truncate(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, ending in TRUNCATED when it was cut."""
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def is_locked(error: Exception) -> bool:
    """A sqlite lock, as MLflow reports it (MlflowException) or SQLAlchemy does while a store opens."""
    return "database is locked" in str(error)


def retry_if_locked(call: Callable[..., T]) -> Callable[..., T]:
    """`call`, retried with exponential backoff while the sqlite store reports a lock.

    MLflow already waits up to 20 s for a lock inside each call (sqlite's busy_timeout); a lock
    error reaching us means a writer held it longer, so the retries wait seconds, not milliseconds.
    """

    @functools.wraps(call)
    def retrying(*args: Any, **kwargs: Any) -> T:
        for attempt in range(LOCK_RETRIES - 1):
            try:
                return call(*args, **kwargs)
            except Exception as error:
                if not is_locked(error):
                    raise
            delay = LOCK_BACKOFF_S * 2**attempt
            log.warning("MLflow store locked during %s; retry %d in %.1f s", call.__name__, attempt + 1, delay)
            time.sleep(delay)
        return call(*args, **kwargs)

    return retrying


@retry_if_locked
def open_client(tracking_uri: str) -> MlflowClient:
    """A client of the store at `tracking_uri`, which must be a resolved URI.

    A sqlite store is opened under an exclusive lock on a file beside it: opening creates a new
    store's tables, which MLflow does without a lock of its own, so the jobs of a sweep opening
    the same new store at once failed in its migrations ("table ... already exists"). A tracking
    server is asked first whether it is up, so a job fails at once rather than after MLflow's
    minutes of connection retries. A file store named by the user is opened (MLflow 3 refuses one
    without $MLFLOW_ALLOW_FILE_STORE).
    """
    database = sqlite_path(tracking_uri)
    if database is None:
        allow_file_store(tracking_uri)
        check_server(tracking_uri)
        return MlflowClient(tracking_uri=tracking_uri)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return MlflowClient(tracking_uri=tracking_uri)


@contextmanager
def unseeded_random() -> Iterator[None]:
    """Python's `random` drawn from fresh entropy inside, restored to its seeded state afterwards.

    Training seeds `random`, so MLflow's random run names would otherwise repeat for every run
    with the same seed; restoring keeps the training streams exactly as seeded.
    """
    state = random.getstate()
    random.seed()
    try:
        yield
    finally:
        random.setstate(state)


def process_namespace() -> str:
    """Where a pid means one process: the host name, and on Linux its boot and pid namespace."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return " ".join(parts)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists here (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LockRetryingClient:
    """An MlflowClient whose every method retries on a locked sqlite store, and names the store
    (`database`) when a write fails for want of disk."""

    def __init__(self, client: MlflowClient, database: Path | None) -> None:
        self._client = client
        self._database = database

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        call = retry_if_locked(attribute)
        if self._database is None:
            return call

        @functools.wraps(call)
        def reporting(*args: Any, **kwargs: Any) -> Any:
            with written(self._database, remove=False):
                return call(*args, **kwargs)

        return reporting


class MLflowTracker:
    """One MLflow run: created, or resumed by id, by `start`; closed by `end`.

    tracking_uri: where runs are stored; None means $MLFLOW_TRACKING_URI if set, else
    sqlite:///outputs/mlflow.db under the working directory. A sqlite file's folder is created if
    missing, and experiments created in it keep their artifacts in <that folder>/mlartifacts.
    """

    def __init__(self, tracking_uri: str | None, experiment_name: str, run_name: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.run_name = run_name
        database = sqlite_path(self.tracking_uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        self._artifact_location = (database.parent / ARTIFACTS_DIR).as_uri() if database else None
        with written(database, remove=False) if database else contextlib.nullcontext():
            client = open_client(self.tracking_uri)
        self._client: Any = _LockRetryingClient(client, database)
        self._run_id: str | None = None
        self._ended = False

    @property
    def run_id(self) -> str | None:
        """The current run's id (stored in checkpoints so a resumed job continues the same run)."""
        return self._run_id

    # ----------------------------------------------------------------------------- lifecycle

    def start(self, run_id: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Create a run with these params and tags, or resume `run_id`; return the run id.

        A resumed run keeps the params and tags it started with (MLflow forbids changing a
        param); only tags it does not have yet are added, and its status goes back to RUNNING.
        """
        if self._run_id is not None and not self._ended:
            raise RuntimeError(f"MLflow run {self._run_id} is still active: end() it before start()")
        if run_id is None:
            experiment_id = self._experiment_id()
            with unseeded_random():  # MLflow draws its run names from `random`, which training seeded
                run = self._client.create_run(experiment_id, run_name=self.run_name)
            self._run_id = run.info.run_id
            self._log_params(params)
            self._log_tags(tags)
        else:
            existing = self._existing_run(run_id)
            experiment_id = existing.info.experiment_id
            self._run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
            self._log_tags({key: value for key, value in tags.items() if key not in existing.data.tags})
        self._ended = False
        self._log_tags({PID_TAG: str(os.getpid()), HOST_TAG: process_namespace()})
        self.close_stale_runs(experiment_id, tags.get("run_dir"))
        return self._run_id

    def tag_resume(self, overrides: Sequence[str]) -> str:
        """Record this launch's overrides on the resumed run as resume_<n>_overrides (n = 1, 2, ...); return the key."""
        tags = self._client.get_run(self._active_run()).data.tags
        done = [int(match.group(1)) for match in map(RESUME_TAG.fullmatch, tags) if match]
        key = f"resume_{max(done, default=0) + 1}_overrides"
        self._log_tags({key: " ".join(overrides) or "(none)"})
        return key

    def close_stale_runs(self, experiment_id: str, run_dir: str | None) -> list[str]:
        """End as KILLED the experiment's other RUNNING runs whose process is gone; return their ids.

        Gone means: the run was logged from `run_dir`, which this process holds locked (so nothing
        else trains there now), or by a process of this host (and pid namespace) that has exited.
        Runs a kill -9, an OOM kill or a lost machine left RUNNING are then closed at the next start.
        """
        here = process_namespace()
        closed = []
        for run in self._client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            tags = run.data.tags
            if run.info.run_id == self._run_id:
                continue
            if run_dir is not None and tags.get("run_dir") == run_dir:
                reason = f"its run dir {run_dir} was taken over by run {self._run_id}"
            elif tags.get(HOST_TAG) == here and PID_TAG in tags and not pid_alive(int(tags[PID_TAG])):
                reason = f"its process {tags[PID_TAG]} on this host had ended when run {self._run_id} started"
            else:
                continue
            self._client.set_tag(run.info.run_id, STALE_TAG, reason)
            self._client.set_terminated(run.info.run_id, status="KILLED")
            log.warning("MLflow run %s was left RUNNING; marked KILLED: %s", run.info.run_id, reason)
            closed.append(run.info.run_id)
        return closed

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED; a second call, or one before start, does nothing."""
        if status not in END_STATUSES:
            raise ValueError(f"run status must be one of {END_STATUSES}, got {status!r}")
        if self._run_id is None or self._ended:
            return
        self._client.set_terminated(self._run_id, status=status)
        self._ended = True

    # ------------------------------------------------------------------------------- logging

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log all metrics at `step` with one timestamp; NaN and inf are kept (they are findings)."""
        run_id = self._active_run()
        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        for batch in chunks(entries, METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=batch)

    def last_logged_step(self, key: str) -> int | None:
        """The highest step logged for `key` in this run, None if never (resume skips up to it)."""
        history = self._client.get_metric_history(self._active_run(), key)
        return max((metric.step for metric in history), default=None)

    def log_image_grid(self, images: Tensor, captions: list[str], step: int, key: str = "samples") -> None:
        """The captioned grid both in the UI's per-step image view (grouped by `key`) and as {key}/epoch_{step}.png."""
        run_id = self._active_run()
        grid = make_grid(images, captions)
        self._client.log_image(run_id, grid, key=key, step=step)
        self._client.log_image(run_id, grid, artifact_file=f"{key}/epoch_{step:05d}.png")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file into `artifact_path`, or a directory's contents into `artifact_path`
        (default: a folder named like the directory)."""
        run_id, path = self._active_run(), Path(path)
        if path.is_dir():
            self._client.log_artifacts(run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self._client.log_artifact(run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"no file or directory to log at {path}")

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file`, e.g. the resolved config as config.yaml."""
        self._client.log_text(self._active_run(), text, artifact_file)

    # ------------------------------------------------------------------------------- helpers

    def _active_run(self) -> str:
        if self._run_id is None or self._ended:
            raise RuntimeError("no active MLflow run: call start() first")
        return self._run_id

    def _experiment_id(self) -> str:
        """The experiment's id, creating it (tagged with its kind) on first use."""
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return self._client.create_experiment(
                    self.experiment_name, self._artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException as error:  # another job of the sweep created it meanwhile
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self._client.get_experiment_by_name(self.experiment_name)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self._client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _existing_run(self, run_id: str) -> Any:
        try:
            return self._client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ValueError(
                f"cannot resume MLflow run {run_id!r}: not found in {self.tracking_uri} "
                "(set logger.tracking_uri to the store the run was logged to)"
            ) from error

    def _log_params(self, params: Mapping[str, Any]) -> None:
        entries = [Param(key, truncate(str(value), PARAM_VALUE_MAX)) for key, value in params.items()]
        for batch in chunks(entries, PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._active_run(), params=batch)

    def _log_tags(self, tags: Mapping[str, str]) -> None:
        entries = [RunTag(key, truncate(str(value), TAG_VALUE_MAX)) for key, value in tags.items()]
        for batch in chunks(entries, PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._active_run(), tags=batch)
