"""Jobs logging to one MLflow store at the same time lose nothing: a shared sqlite file, and the
tracking server of launchers/mlflow_server.sh; a real 4-job local sweep against that server."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pcpo_hydra.config import validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.tracking import MLflowTracker
from test_training import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "launchers" / "mlflow_server.sh"
JOBS = 4
STEPS, KEYS, PARAMS = 40, 8, 150  # 40 log_batch calls per job; params take two batches of 100
JOB_TIMEOUT_S = 300
SWEEP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_script(command: str, state: Path, port: int, timeout: float = 180) -> subprocess.CompletedProcess:
    """launchers/mlflow_server.sh with its state in `state`, on `port`, running this test's python."""
    env = {**os.environ, "PCPO_MLFLOW_PORT": str(port), "PCPO_MLFLOW_DIR": str(state), "PCPO_PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=timeout)


class Server(NamedTuple):
    uri: str
    port: int
    state: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A tracking server on a free loopback port with a fresh store; stopped after the module."""
    state, port = tmp_path_factory.mktemp("mlflow_server"), free_port()
    started = time.perf_counter()
    result = server_script("start", state, port)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"mlflow server started in {time.perf_counter() - started:.1f} s")
    try:
        yield Server(f"http://127.0.0.1:{port}", port, state)
    finally:
        stopped = server_script("stop", state, port, timeout=60)
        assert "stopped" in stopped.stdout, stopped.stdout + stopped.stderr


# ------------------------------------------------------------------------------------ configs


def test_the_local_launcher_sizes_jobs_from_the_hardware_preset() -> None:
    overrides = ["hydra/launcher=local", "hardware=cpu2_zero2", "hardware.slurm.timeout_min=7"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.LocalLauncher")
    assert (launcher["tasks_per_node"], launcher["nodes"], launcher["timeout_min"]) == (2, 1, 7)  # 2 ZeRO processes
    slurm = cfg.hardware.slurm
    assert (launcher["cpus_per_task"], launcher["gpus_per_node"], launcher["mem_gb"]) == (
        slurm.cpus_per_task, slurm.gpus_per_node, slurm.mem_gb)


def test_logger_mlflow_server_points_at_the_port_in_the_environment(
    compose_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PCPO_MLFLOW_PORT", raising=False)
    cfg = validate(compose_cfg("logger=mlflow_server"))
    assert cfg.logger.tracking_uri == "http://127.0.0.1:5000" and cfg.logger.experiment_name == "pcpo-hydra"
    assert cfg.logger._target_ == "pcpo_hydra.tracking.MLflowTracker"
    monkeypatch.setenv("PCPO_MLFLOW_PORT", "6123")
    assert validate(compose_cfg("logger=mlflow_server")).logger.tracking_uri == "http://127.0.0.1:6123"


def test_the_server_script_without_a_server_reports_it_and_stops_nothing(tmp_path: Path) -> None:
    port = free_port()
    status = server_script("status", tmp_path, port)
    assert status.returncode == 3 and "not running" in status.stdout
    stop = server_script("stop", tmp_path, port)
    assert stop.returncode == 0 and "not running" in stop.stdout
    assert server_script("restart", tmp_path, port).returncode == 2


# ------------------------------------------------------------------------ concurrent logging


def metric_value(job: int, key: int, step: int) -> float:
    """Distinct per (job, key, step), so a value logged into the wrong run or step is caught."""
    return job * 1e6 + key * 1e3 + step + 0.25


def job_params(job: int) -> dict[str, str]:
    return {f"group.key_{i:03d}": f"job{job}-{i}" for i in range(PARAMS)}


def log_one_job(tracking_uri: str, experiment: str, job: int, barrier, artifact_dir: str) -> None:
    """One sweep job: waits for the others, then opens the store, creates its run and logs it all."""
    barrier.wait(timeout=JOB_TIMEOUT_S)  # every job opens the store and creates the experiment at once
    tracker = MLflowTracker(tracking_uri, experiment, run_name=f"job{job}")
    tracker.start(None, job_params(job), {"job": str(job), "sweep": experiment})
    for step in range(1, STEPS + 1):
        tracker.log_metrics({f"m/{key}": metric_value(job, key, step) for key in range(KEYS)}, step)
    note = Path(artifact_dir) / f"job{job}.txt"
    note.write_text(f"written by job {job}\n")
    tracker.log_artifact(note, "notes")
    tracker.end()


def run_jobs_at_once(tracking_uri: str, experiment: str, artifact_dir: Path) -> float:
    """JOBS spawned processes logging through MLflowTracker at the same moment; their wall time."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(JOBS)
    processes = [
        context.Process(target=log_one_job, args=(tracking_uri, experiment, job, barrier, str(artifact_dir)))
        for job in range(JOBS)
    ]
    started = time.perf_counter()
    for process in processes:
        process.start()
    deadline = started + JOB_TIMEOUT_S
    for process in processes:
        process.join(timeout=max(deadline - time.perf_counter(), 0))
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"{len(hung)} jobs still running after {JOB_TIMEOUT_S} s"
    assert [process.exitcode for process in processes] == [0] * JOBS
    return time.perf_counter() - started


def assert_nothing_lost(tracking_uri: str, experiment: str, download_dir: Path) -> None:
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert sorted(run.data.tags["job"] for run in runs) == [str(job) for job in range(JOBS)]
    for run in runs:
        job, run_id = int(run.data.tags["job"]), run.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_name == f"job{job}"
        assert run.data.params == job_params(job) and run.data.tags["sweep"] == experiment
        for key in range(KEYS):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"m/{key}"))
            assert logged == [(step, metric_value(job, key, step)) for step in range(1, STEPS + 1)]
        note = Path(client.download_artifacts(run_id, f"notes/job{job}.txt", str(download_dir)))
        assert note.read_text() == f"written by job {job}\n"


@pytest.mark.integration
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_jobs_logging_at_once_lose_no_metric_param_tag_or_artifact(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # sqlite: a store that does not exist yet, which every job creates at the same moment
    sqlite_uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    tracking_uri = sqlite_uri if store == "sqlite" else request.getfixturevalue("server").uri
    experiment = f"stress-{store}"
    (tmp_path / "notes").mkdir()
    seconds = run_jobs_at_once(tracking_uri, experiment, tmp_path / "notes")
    print(f"{JOBS} jobs x {STEPS} steps x {KEYS} metrics into {store}: {seconds:.1f} s")
    (tmp_path / "downloads").mkdir()
    assert_nothing_lost(tracking_uri, experiment, tmp_path / "downloads")


# ---------------------------------------------------------------------------------- a sweep


def run_bounded(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`command` in a session of its own, killed with everything it started if it outlives `timeout`.

    The local launcher's jobs are children of the sweep's process: a plain timeout would leave them.
    """
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def job_logs(sweep_dir: Path) -> str:
    return "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in sorted(sweep_dir.glob(".submitit/*/*.err")))


@pytest.mark.integration
def test_a_local_sweep_of_four_jobs_logs_every_epoch_of_each_to_the_server(server: Server, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["PCPO_MLFLOW_PORT"] = str(server.port)
    command = [
        sys.executable, "-m", "pcpo_hydra.train", "-m", "seed=0,1,2,3", "hydra/launcher=local",
        "logger=mlflow_server", f"hydra.sweep.dir={sweep_dir}", *TINY, "epochs=2", "hardware.slurm.timeout_min=10",
    ]
    started = time.perf_counter()
    result = run_bounded(command, env, SWEEP_TIMEOUT_S)
    print(f"sweep of {JOBS} local jobs: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep_dir)

    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    assert sorted(run.data.params["seed"] for run in runs) == ["0", "1", "2", "3"]
    assert sorted(run.data.tags["run_dir"] for run in runs) == [str(sweep_dir / str(job)) for job in range(JOBS)]
    for run in runs:
        assert run.info.status == "FINISHED"
        rewards = client.get_metric_history(run.info.run_id, "rollout/reward_mean")
        assert sorted(metric.step for metric in rewards) == [1, 2]
        assert all(-10.0 < metric.value < 0.0 for metric in rewards)  # minus a JPEG size in kB


@pytest.mark.integration
def test_starting_a_running_server_again_keeps_it_and_says_so(server: Server) -> None:
    pid = (server.state / "server.pid").read_text().strip()
    again = server_script("start", server.state, server.port)
    assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    status = server_script("status", server.state, server.port)
    assert status.returncode == 0 and f"export MLFLOW_TRACKING_URI={server.uri}" in status.stdout.splitlines()
    assert (server.state / "mlflow.db").is_file() and (server.state / "server.pid").read_text().strip() == pid
