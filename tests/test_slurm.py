"""On a real single-node SLURM cluster (launchers/slurm/up.sh): a batch job, a sweep through
`hydra/launcher=slurm`, and a preempted run that is requeued and resumes into the same MLflow run.

The cluster has no accounting database, so job states come from `scontrol` (which keeps finished
jobs for MinJobAge, 5 minutes) instead of `sacct`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_training import EXPERIMENT, TINY

pytestmark = pytest.mark.integration

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers" / "slurm"
REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # where the daemons live
# One CPU per job: the jobs of a sweep then run side by side on a 2-core machine.
SLURM_TINY = [*TINY, "hydra/launcher=slurm", "hardware.slurm.cpus_per_task=1"]
PREEMPTED_EPOCHS = 6  # the signal comes once epoch 2 is logged: the run is still going, and resumes for the rest


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.2) -> object:
    """Poll `condition` until it returns something truthy; fail the test (never hang) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


def free_port_pair() -> int:
    """A port p with p and p + 1 free on loopback (slurmctld, slurmd): a cluster already up stays untouched."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def require_slurm() -> None:
    """Skip where SLURM is not installed, except in CI, which installs it and must run these tests."""
    missing = [name for name in REQUIRED if shutil.which(name, path=SBIN_PATH) is None]
    if not missing:
        return
    message = f"SLURM not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private cluster for this session; yields the environment that submits to it. Stopped at teardown."""
    require_slurm()
    cluster = {"PCPO_SLURM_DIR": str(tmp_path_factory.mktemp("slurm")), "PCPO_SLURM_PORT": str(free_port_pair())}
    env = {**os.environ, **cluster, "PATH": SBIN_PATH}
    pid_files = Path(cluster["PCPO_SLURM_DIR"]) / "run"
    try:
        env["SLURM_CONF"] = bring_up(env)
        yield env
    finally:
        pids = daemon_pids(pid_files)
        for _ in range(2):  # stopping a stopped cluster is harmless
            down = subprocess.run([LAUNCHERS / "down.sh"], env=env, capture_output=True, text=True, timeout=60)
            assert down.returncode == 0, down.stderr
        assert not [pid for pid in pids.values() if Path(f"/proc/{pid}").exists()], "a daemon was left running"


def bring_up(env: dict[str, str]) -> str:
    """Run up.sh; returns the SLURM_CONF of the line it prints to eval."""
    up = subprocess.run([LAUNCHERS / "up.sh"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    line = up.stdout.strip()
    assert line.startswith("export SLURM_CONF="), up.stdout
    return line.removeprefix("export SLURM_CONF=")


def daemon_pids(pid_files: Path) -> dict[str, int]:
    return {f.stem: int(f.read_text()) for f in pid_files.glob("*.pid")}


def slurm(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result.stdout


def job_records(env: dict[str, str], job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per job (an array job gives one per task)."""
    output = slurm(env, "scontrol", "--oneliner", "show", "job", job_id)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in output.splitlines() if line.strip()]


def running_jobs(env: dict[str, str]) -> list[str]:
    return slurm(env, "squeue", "--noheader", "--states=RUNNING", "--format=%i").split()


def finished(env: dict[str, str], job_id: str) -> list[dict[str, str]] | None:
    """The job's records once no part of it is pending, running or being requeued."""
    records = job_records(env, job_id)
    active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED"}
    return None if any(r["JobState"] in active for r in records) else records


def mlflow_runs(store: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


def test_up_again_keeps_the_running_cluster(slurm_env: dict[str, str]) -> None:
    pid_files = Path(slurm_env["PCPO_SLURM_DIR"]) / "run"
    before = daemon_pids(pid_files)
    assert sorted(before) == ["munged", "slurmctld", "slurmd"]
    assert bring_up(slurm_env) == slurm_env["SLURM_CONF"]
    assert daemon_pids(pid_files) == before  # nothing restarted, nothing started twice
    assert slurm(slurm_env, "sinfo", "--noheader", "--format=%D %T").split() == ["1", "idle"]


def test_batch_job_runs_to_completion(slurm_env: dict[str, str], tmp_path: Path) -> None:
    output = tmp_path / "hello.out"
    job_id = slurm(slurm_env, "sbatch", "--parsable", f"--output={output}",
                   "--wrap", 'echo "job $SLURM_JOB_ID"; srun echo "step on $(hostname -s)"').strip()

    (record,) = wait_for(lambda: finished(slurm_env, job_id), 30, f"job {job_id} to finish")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0"
    assert output.read_text().splitlines() == [f"job {job_id}", f"step on {socket.gethostname().split('.')[0]}"]


def test_sweep_through_slurm_completes_and_tags_both_runs(slurm_env: dict[str, str], tmp_path: Path) -> None:
    store, sweep = tmp_path / "mlflow.db", tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "pcpo_hydra.train", "-m", "algorithm=grpo,pcpo", *SLURM_TINY, "epochs=1",
         f"hydra.sweep.dir={sweep}"],
        env={**slurm_env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # One job array, one task per run, both COMPLETED in SLURM's own record (the launcher returns
    # when the results are written, a moment before the tasks' processes have exited).
    client, runs = mlflow_runs(store)
    assert len(runs) == 2
    array_id = runs[0].data.tags["slurm_job_id"].split("_")[0]
    records = wait_for(lambda: finished(slurm_env, array_id), 30, f"job array {array_id} to end")
    assert sorted((r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in records) == [
        ("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")]

    by_job = {run.data.tags["job_num"]: run for run in runs}
    assert sorted(by_job) == ["0", "1"]
    for num, algorithm in (("0", "grpo"), ("1", "pcpo")):  # jobs are numbered in the sweep's order
        run = by_job[num]
        assert run.info.status == "FINISHED"
        assert run.data.tags["algorithm"] == algorithm
        assert run.data.tags["sweep_id"] == str(sweep.resolve())
        assert run.data.tags["slurm_job_id"] == f"{array_id}_{num}"
        assert run.data.tags["run_dir"] == str(sweep / num)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "rollout/reward_mean")] == [1]


def test_warning_signal_requeues_the_job_which_resumes_the_same_run(slurm_env: dict[str, str], tmp_path: Path) -> None:
    store, sweep = tmp_path / "mlflow.db", tmp_path / "sweep"
    train_log, launcher_log = sweep / "0" / "train.log", tmp_path / "launcher.log"
    with launcher_log.open("w") as output:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "pcpo_hydra.train", "-m", *SLURM_TINY, f"epochs={PREEMPTED_EPOCHS}",
             "log_images_every=0", f"hydra.sweep.dir={sweep}"],
            env={**slurm_env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, stdout=output, stderr=subprocess.STDOUT,
        )
        try:
            (job_id,) = wait_for(lambda: running_jobs(slurm_env), 60, "the job to start")
            wait_for(lambda: train_log.is_file() and f"epoch 2/{PREEMPTED_EPOCHS}" in train_log.read_text(), 90,
                     "epoch 2 in the job's train.log", every_s=0.1)
            # What SLURM sends before a time limit (--signal), here at once, to every step of the job.
            slurm(slurm_env, "scancel", "--signal=USR1", job_id)
            assert launcher.wait(timeout=150) == 0, launcher_log.read_text()[-3000:]
        finally:
            launcher.kill()  # a no-op once it has exited; the cluster's teardown cancels a job left behind

    (record,) = wait_for(lambda: finished(slurm_env, job_id), 30, f"job {job_id} to end")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1"  # requeued exactly once
    log = train_log.read_text()  # both attempts of the job append to the run's log
    stopped = int(re.search(r"stopped by SIGUSR1 after epoch (\d+)", log).group(1))
    assert f"resumed {sweep / '0' / 'checkpoints' / f'epoch_{stopped:05d}'} at epoch {stopped}" in log
    assert 2 <= stopped < PREEMPTED_EPOCHS
    assert (sweep / "0" / "checkpoints" / f"epoch_{PREEMPTED_EPOCHS:05d}" / "trainer.pt").is_file()

    client, runs = mlflow_runs(store)
    (run,) = runs  # the requeued job continued the first one's MLflow run ...
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "rollout/reward_mean")]
    assert sorted(steps) == list(range(1, PREEMPTED_EPOCHS + 1))  # ... and logged every epoch once
