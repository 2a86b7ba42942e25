"""Policy sources that need more than a folder: an MLflow run id, and a run's checkpoint matched to a reward.

`runs:/<run id>` names a training run in the MLflow store of the `logger` group. Its `run_dir` tag
says where it trained; when that folder is on this machine it is the source, else the run's logged
`weights` and `config.yaml` artifacts are downloaded into `<out>/.policies/<run id>/`, laid out as a
run dir (`final_weights/`, `.hydra/config.yaml`), so everything downstream sees a run dir either way.

`match.reward` replaces each run dir by the checkpoint whose held-out evaluation reward is nearest
that target (or just below or above it: `match.pick`), so two algorithms are sampled at equal
reward rather than at equal epochs (`evaluation.matching`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pcpo_hydra.config.validation import ConfigError
from pcpo_hydra.evaluation.matching import Match, MatchError, match_reward
from pcpo_hydra.sampling.config import RUNS_PREFIX

DOWNLOADS = ".policies"  # under `out`: what a policy run not on this machine brought from the store
WEIGHTS_ARTIFACT, CONFIG_ARTIFACT = "weights", "config.yaml"  # what build.run logs to a training run


def _client(logger: DictConfig) -> Any:
    from pcpo_hydra.mlflow_store import resolve_tracking_uri
    from pcpo_hydra.tracking import open_client

    return open_client(resolve_tracking_uri(logger.tracking_uri))


def _is_run_dir(path: Path) -> bool:
    """A folder pcpo-train ran in (Hydra's .hydra/ beside its checkpoints), not a weights folder."""
    return (Path(path) / ".hydra").is_dir()


def _downloaded(client: Any, run_id: str, folder: Path) -> Path:
    """The run's weights and config artifacts as a run dir under `folder` (downloaded once)."""
    from mlflow.artifacts import download_artifacts

    run_dir = folder / run_id
    if not (run_dir / "final_weights").is_dir():
        staging = run_dir / "download"
        download_artifacts(run_id=run_id, artifact_path=WEIGHTS_ARTIFACT, dst_path=str(staging),
                           tracking_uri=client.tracking_uri)
        download_artifacts(run_id=run_id, artifact_path=CONFIG_ARTIFACT, dst_path=str(staging),
                           tracking_uri=client.tracking_uri)
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (staging / CONFIG_ARTIFACT).rename(run_dir / ".hydra" / "config.yaml")
        (staging / WEIGHTS_ARTIFACT).rename(run_dir / "final_weights")
        staging.rmdir()
    return run_dir


def local_run_dir(source: str, key: str, logger: DictConfig, out: Path) -> str:
    """A `runs:/<id>` source as a run dir on this machine; any other source unchanged. ConfigError if not found."""
    if not source.startswith(RUNS_PREFIX):
        return source
    from mlflow.exceptions import MlflowException

    from pcpo_hydra.mlflow_store import resolve_tracking_uri, sqlite_path

    run_id = source[len(RUNS_PREFIX):].strip("/")
    database = sqlite_path(resolve_tracking_uri(logger.tracking_uri))
    if database is not None and not database.is_file():  # opening it would create an empty store
        raise ConfigError([f"{key}={source!r}: there is no MLflow store at {database}; set logger.tracking_uri "
                           "to the store the run was logged to"])
    client = _client(logger)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError([f"{key}={source!r}: no such run in the MLflow store {client.tracking_uri} "
                           f"({str(error).splitlines()[0]}); set logger.tracking_uri to the store it was logged to"])
    run_dir = run.data.tags.get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        return run_dir
    try:
        return str(_downloaded(client, run_id, out / DOWNLOADS))
    except (MlflowException, OSError) as error:
        raise ConfigError([f"{key}={source!r}: its run dir {run_dir!r} is not on this machine and its "
                           f"{WEIGHTS_ARTIFACT}/ and {CONFIG_ARTIFACT} artifacts could not be downloaded "
                           f"({str(error).splitlines()[0]}); give the run dir instead"])


def _training_run_id(client: Any, run_dir: Path) -> str | None:
    """The MLflow run that trained in `run_dir` (its `run_dir` tag), in any experiment of the store."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.run_dir = '{Path(run_dir).resolve()}'",
                              max_results=1) if experiments else []
    return runs[0].info.run_id if runs else None


def source_runs(manifest: dict[str, Any], logger: DictConfig) -> dict[str, str]:
    """{policy name: MLflow id of the run that trained it} for a sample folder's run-dir sources (matched ones too)."""
    run_dirs = {name: Path(manifest.get("matches", {}).get(name, {}).get("run_dir", source))
                for name, source in manifest.get("sources", {}).items()}
    run_dirs = {name: run_dir for name, run_dir in run_dirs.items() if _is_run_dir(run_dir)}
    if not run_dirs:
        return {}
    client = _client(logger)  # one store opened for every source
    found = {name: _training_run_id(client, run_dir) for name, run_dir in run_dirs.items()}
    return {name: run_id for name, run_id in found.items() if run_id is not None}


def matched_checkpoint(source: str, key: str, match: DictConfig) -> Match | None:
    """The checkpoint of run dir `source` at `match.reward` (None when no match is asked or `source` is no run dir)."""
    if match.reward is None or not _is_run_dir(Path(source)):
        return None
    try:
        return match_reward(Path(source), float(match.reward), match.pick)
    except MatchError as error:
        raise ConfigError([f"{key}={source!r}: {error}"]) from None
