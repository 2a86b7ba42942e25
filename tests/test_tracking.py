"""MLflow tracking against a real sqlite store: runs, params, metrics, resume, images, artifacts."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from pcpo_hydra import tracking
from pcpo_hydra.image_grid import make_grid
from pcpo_hydra.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MLflowTracker,
    PARAM_VALUE_MAX,
    TRUNCATED,
    flatten_config,
    git_commit,
    resolve_tracking_uri,
    retry_if_locked,
)

EXPERIMENT = "tests"


@pytest.fixture
def tracker(store: str) -> MLflowTracker:
    return MLflowTracker(store, EXPERIMENT, run_name="unit")


def new_run(tracker: MLflowTracker, params: dict[str, str] | None = None) -> str:
    return tracker.start(None, params or {"seed": "0"}, {"algorithm": "pcpo"})


def test_a_new_run_has_its_params_tags_name_and_experiment_kind(store: str, tracker: MLflowTracker) -> None:
    params = {f"group.key_{i}": str(i) for i in range(250)}  # three log_batch calls
    params["prompts.long"] = "x" * (PARAM_VALUE_MAX + 10)
    run_id = tracker.start(None, params, {"algorithm": "pcpo", "overrides": "seed=1"})
    run = MlflowClient(store).get_run(run_id)
    assert run.info.run_name == "unit" and run.info.status == "RUNNING" and tracker.run_id == run_id
    assert len(run.data.params) == 251 and run.data.params["group.key_7"] == "7"
    long = run.data.params["prompts.long"]
    assert len(long) == PARAM_VALUE_MAX and long.endswith(TRUNCATED)
    assert run.data.tags["algorithm"] == "pcpo" and run.data.tags["overrides"] == "seed=1"
    experiment = MlflowClient(store).get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT and experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_artifacts_live_next_to_the_sqlite_file(store: str, tracker: MLflowTracker) -> None:
    run = MlflowClient(store).get_run(new_run(tracker))
    database = tracking.sqlite_path(store)
    assert database is not None and database.parent.is_dir()
    assert run.info.artifact_uri.startswith((database.parent / tracking.ARTIFACTS_DIR).as_uri())


def test_metrics_are_logged_per_step_and_read_back(store: str, tracker: MLflowTracker) -> None:
    run_id = new_run(tracker)
    assert tracker.last_logged_step("rollout/reward_mean") is None
    for step in (1, 2, 3):
        metrics = {"rollout/reward_mean": step / 10, "train/approx_kl": 1e-5, "train/nan": math.nan}
        tracker.log_metrics(metrics, step)
    history = MlflowClient(store).get_metric_history(run_id, "rollout/reward_mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert all(math.isnan(m.value) for m in MlflowClient(store).get_metric_history(run_id, "train/nan"))
    assert tracker.last_logged_step("rollout/reward_mean") == 3


def test_resume_continues_the_same_run_without_relogging_params(store: str, tracker: MLflowTracker) -> None:
    run_id = new_run(tracker, {"seed": "0"})
    tracker.log_metrics({"rollout/reward_mean": 1.0}, step=1)
    tracker.log_metrics({"rollout/reward_mean": 2.0}, step=2)
    tracker.end("KILLED")

    resumed = MLflowTracker(store, EXPERIMENT)
    assert resumed.start(run_id, {"seed": "1"}, {"algorithm": "grpo", "resumed_from": "epoch 2"}) == run_id
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.params["seed"] == "0"
    assert run.data.tags["algorithm"] == "pcpo" and run.data.tags["resumed_from"] == "epoch 2"
    assert resumed.last_logged_step("rollout/reward_mean") == 2
    resumed.log_metrics({"rollout/reward_mean": 3.0}, step=3)
    steps = [m.step for m in MlflowClient(store).get_metric_history(run_id, "rollout/reward_mean")]
    assert sorted(steps) == [1, 2, 3]


def test_resuming_an_unknown_run_names_the_setting(tracker: MLflowTracker) -> None:
    with pytest.raises(ValueError, match="logger.tracking_uri"):
        tracker.start("0" * 32, {}, {})


def test_image_grid_is_a_png_artifact_and_a_stepped_image(
    store: str, tracker: MLflowTracker, tmp_path: Path
) -> None:
    run_id = new_run(tracker)
    images, captions = torch.rand(6, 3, 64, 64), [f"prompt {i} | {i:.3g}" for i in range(6)]
    tracker.log_image_grid(images, captions, step=5)
    client = MlflowClient(store)
    local = Path(client.download_artifacts(run_id, "samples/epoch_00005.png", str(tmp_path)))
    with Image.open(local) as png:
        assert png.format == "PNG" and png.size == make_grid(images, captions).size
        assert png.width == 3 * 128  # 6 tiles in rows of 3, 64 px enlarged to 128
    stepped = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(path.startswith("images/samples+step+5+") and path.endswith(".png") for path in stepped)


def test_files_directories_and_text_become_artifacts(
    store: str, tracker: MLflowTracker, tmp_path: Path
) -> None:
    run_id = new_run(tracker)
    weights = tmp_path / "final_weights"
    weights.mkdir()
    (weights / "adapter.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(weights, "weights")
    tracker.log_artifact(weights)
    tracker.log_artifact(tmp_path / "notes.txt")
    tracker.log_text("seed: 0\n", "config.yaml")
    client = MlflowClient(store)
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert logged >= {"weights", "final_weights", "notes.txt", "config.yaml"}
    assert [a.path for a in client.list_artifacts(run_id, "weights")] == ["weights/adapter.safetensors"]
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(tmp_path / "missing")


def test_end_sets_the_status_once(store: str, tracker: MLflowTracker) -> None:
    tracker.end()  # before start: nothing to end
    run_id = new_run(tracker)
    with pytest.raises(ValueError, match="FINISHED"):
        tracker.end("DONE")
    tracker.end("FAILED")
    tracker.end("FINISHED")
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"x": 1.0}, step=1)


def test_two_trackers_in_one_process_keep_their_runs_apart(store: str) -> None:
    first, second = MLflowTracker(store, EXPERIMENT), MLflowTracker(store, EXPERIMENT)
    ids = new_run(first), new_run(second)
    first.log_metrics({"m": 1.0}, step=1)
    second.log_metrics({"m": 2.0}, step=1)
    values = [MlflowClient(store).get_metric_history(run_id, "m")[0].value for run_id in ids]
    assert values == [1.0, 2.0]


def test_an_experiment_another_job_created_meanwhile_is_joined(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = MlflowClient(store).create_experiment("race")
    lookups: list[str] = []
    real_lookup = MlflowClient.get_experiment_by_name

    def lookup_before_the_other_job(client: MlflowClient, name: str):
        lookups.append(name)  # the first lookup happens before the other job's creation lands
        return None if len(lookups) == 1 else real_lookup(client, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lookup_before_the_other_job)
    run_id = new_run(MLflowTracker(store, "race"))
    monkeypatch.undo()
    assert lookups == ["race", "race"]
    assert MlflowClient(store).get_run(run_id).info.experiment_id == existing


def test_an_unreachable_tracking_server_fails_at_once_naming_the_launcher() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:\d+ .*launchers/mlflow_server.sh start"):
        MLflowTracker(f"http://127.0.0.1:{port}", EXPERIMENT)
    assert time.perf_counter() - started < 5


def test_tracking_uri_precedence_is_argument_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'outputs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    relative = resolve_tracking_uri("sqlite:///runs/m.db?timeout=30")
    assert relative == f"sqlite:///{tmp_path.resolve() / 'runs' / 'm.db'}?timeout=30"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_a_locked_store_is_retried_and_other_errors_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    failures = [MlflowException("(sqlite3.OperationalError) database is locked")] * 2

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert retry_if_locked(flaky)() == "ok"
    failures.append(MlflowException("RESOURCE_DOES_NOT_EXIST"))
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        retry_if_locked(flaky)()


def test_flatten_config_dots_nested_keys_and_json_encodes_lists() -> None:
    config = {"model": {"lora": {"rank": 4, "targets": ["to_q", "to_v"]}}, "resume": None, "extra": {}}
    assert flatten_config(config) == {
        "model.lora.rank": "4",
        "model.lora.targets": '["to_q", "to_v"]',
        "resume": "None",
        "extra": "{}",
    }


def test_git_commit_is_a_hash_or_none_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    commit = git_commit()
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    monkeypatch.setenv("PATH", "")  # no git executable at all
    assert git_commit() is None
