"""A resumed run is the run it resumes: its own config, one process per run dir, damaged checkpoints passed over."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from test_training import TINY, only_run

from pcpo_hydra.checkpoint import MANIFEST, intact_checkpoint
from pcpo_hydra.run_lock import LOCK_FILE, RunDirBusy, hold_run_dir

WEIGHTS_FILE = "weights/diffusion_pytorch_model.safetensors"


def cli(store: Path, *overrides: str, cwd: Path | None = None, wait: bool = True, env: dict[str, str] | None = None):
    """`pcpo-train` with exactly these overrides (no tiny preset added: a resume brings its own) and a private store.

    Returns the finished process (stdout and stderr together), or the running one when not `wait`.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", **(env or {})}
    command = [sys.executable, "-m", "pcpo_hydra.train", *overrides]
    if wait:
        return subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def in_log(run_dir: Path, text: str) -> bool:
    log = run_dir / "train.log"
    return log.is_file() and text in log.read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 2-epoch GRPO run (checkpoints at epochs 1 and 2) and its MLflow store."""
    root = tmp_path_factory.mktemp("trained")
    store, run_dir = root / "mlflow.db", root / "run"
    result = cli(store, *TINY, "algorithm=grpo", "epochs=2", "checkpoint_every=1", "log_images_every=0",
                 f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-4000:]
    return run_dir, store


@pytest.fixture
def copy_of(trained, tmp_path: Path) -> tuple[Path, Path]:
    """The trained run and its store copied, for a test that resumes (changes) them."""
    run_dir, store = trained
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copy(store, tmp_path / "mlflow.db")
    return tmp_path / "run", tmp_path / "mlflow.db"


def steps(store: Path, key: str = "rollout/reward_mean") -> list[int]:
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


# ------------------------------------------------------------------------------ the run's own config


@pytest.mark.integration
@pytest.mark.parametrize(("override", "changed"), [
    ("algorithm=pcpo", "algorithm.credit: 'native' -> 'proportional'"),
    ("model=tiny_flux", "model._target_: 'pcpo_hydra.models.tiny.build_tiny_sd' -> "
                        "'pcpo_hydra.models.tiny_flux.build_tiny_flux'"),
    ("model.lora.enabled=true", "model.lora.enabled: False -> True"),
    ("seed=1", "seed: 0 -> 1"),
    ("hardware=cpu2_zero2", "hardware.deepspeed.allgather_bucket_size: None -> 50000000"),
])
def test_a_resume_that_would_change_what_was_trained_is_refused_naming_the_override(trained, override, changed):
    run_dir, store = trained
    start = time.monotonic()
    result = cli(store, f"resume={run_dir}", override)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout[-3000:]
    problems = [line for line in result.stdout.splitlines() if line.startswith(("  - ", "pcpo-train: invalid"))]
    assert len(problems) == 1, result.stdout  # one problem: reported on one line
    assert problems[0].startswith(f"pcpo-train: invalid configuration: {override}: a resume cannot change what "
                                  f"the run trained ({changed}")
    assert "start a new run for it (a resume may change only epochs, checkpoint_every" in problems[0]
    assert "Traceback" not in result.stdout
    print(f"{override}: refused in {elapsed:.1f} s")


@pytest.mark.integration
def test_a_run_saved_before_a_key_existed_resumes_with_the_key_at_its_default(copy_of) -> None:
    """train.cfg, rollout.drop_flat_groups, train.ema and sampler.sde_window came after runs that must still
    resume: conf/ fills them in."""
    run_dir, store = copy_of
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    del saved.train["cfg"], saved.rollout["drop_flat_groups"], saved.train["ema"], saved.sampler["sde_window"]
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    result = cli(store, f"resume={run_dir}", "epochs=3")
    assert result.returncode == 0, result.stdout[-3000:]
    assert steps(store) == [1, 2, 3]
    resumed = sorted((run_dir / ".hydra").glob("resumed_*/config.yaml"))[-1]  # refusals in other tests save theirs too
    config = OmegaConf.load(resumed)
    assert config.train.cfg is True and config.rollout.drop_flat_groups is False
    assert config.train.ema.decay is None and config.train.ema.every == 1
    assert config.sampler.sde_window.size is None  # no window: every step stochastic, as the run trained
    assert config.algorithm.objective == "ratio"  # the run's own keys stay its own
    assert ("keys added to conf/ since the run was saved, at their defaults: rollout.drop_flat_groups=False, "
            "sampler.sde_window.every=1, sampler.sde_window.placement='fixed', sampler.sde_window.range=None, "
            "sampler.sde_window.size=None, sampler.sde_window.stride=1, "
            "train.cfg=True, train.ema.decay=None, train.ema.every=1") in (run_dir / "train.log").read_text()


@pytest.mark.integration
def test_a_resume_from_another_working_directory_is_refused_with_the_cd(trained, tmp_path: Path) -> None:
    run_dir, store = trained
    result = cli(store, f"resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert (f"resume={str(run_dir)!r}: the run was started in {Path.cwd()}, where its relative paths "
            f"(MLflow store, text cache, prompt files) resolve; resume it from there: cd {Path.cwd()}") in result.stdout


@pytest.mark.integration
def test_a_resume_sent_to_another_run_dir_is_refused(trained, tmp_path: Path) -> None:
    run_dir, store = trained
    result = cli(store, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'elsewhere'}")
    assert result.returncode == 2
    assert f"a resumed run writes into the directory it continues ({run_dir}); drop hydra.run.dir" in result.stdout


# ------------------------------------------------------------------------------ one process per run dir


@pytest.mark.integration
def test_a_second_resume_of_a_run_dir_in_use_fails_at_once_naming_the_holder(copy_of) -> None:
    run_dir, store = copy_of
    first = cli(store, f"resume={run_dir}", "epochs=4", wait=False)
    lock = run_dir / LOCK_FILE
    wait_for(lambda: lock.is_file() and lock.read_text() == str(first.pid), "lock taken by the first resume")
    first.send_signal(19)  # SIGSTOP: the first holds the lock for as long as the second takes
    try:
        start = time.monotonic()
        second = cli(store, f"resume={run_dir}", "epochs=4")
        elapsed = time.monotonic() - start
    finally:
        first.send_signal(18)  # SIGCONT
    output, _ = first.communicate(timeout=600)
    assert second.returncode == 1, second.stdout[-3000:]
    assert second.stdout.strip().splitlines()[-1] == (
        f"pcpo-train: run directory {run_dir} is in use by pcpo-train pid {first.pid}; wait for it to end "
        f"(or stop it: kill {first.pid}), then run this again")
    print(f"second resume refused in {elapsed:.1f} s")
    assert first.returncode == 0, output[-3000:]
    assert steps(store) == [1, 2, 3, 4]  # the later epochs once, by the first resume only


HOLD = """
import sys, time
from pcpo_hydra.run_lock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_run_dir_lock_names_its_holder_and_is_free_once_the_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirBusy, match=f"in use by pcpo-train pid {holder.pid}; wait for it to end"):
            with hold_run_dir(tmp_path):
                pass
    finally:
        holder.kill()  # kill -9: no exit handler runs, the kernel drops the lock
        holder.wait()
    with hold_run_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == str(os.getpid())


# ------------------------------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize("damaged", ["trainer.pt", "optimizer.bin", WEIGHTS_FILE])
def test_a_truncated_file_makes_its_checkpoint_damaged_and_the_older_one_is_used(trained, tmp_path, damaged) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0] / "checkpoints", run_dir / "checkpoints")
    newest = run_dir / "checkpoints" / "epoch_00002"
    assert (newest / MANIFEST).is_file() and intact_checkpoint(run_dir) == (newest, [])
    size = (newest / damaged).stat().st_size
    with open(newest / damaged, "r+b") as file:
        file.truncate(size // 2)
    assert intact_checkpoint(run_dir) == (
        run_dir / "checkpoints" / "epoch_00001", [f"{newest / damaged} has {size // 2} bytes, {size} when saved"])
    (newest / damaged).unlink()
    assert intact_checkpoint(run_dir)[1] == [f"{newest / damaged} is missing"]


@pytest.mark.integration
def test_resume_passes_over_a_damaged_latest_checkpoint_and_fails_in_one_line_when_none_is_intact(copy_of) -> None:
    run_dir, store = copy_of
    optimizer = run_dir / "checkpoints" / "epoch_00002" / "optimizer.bin"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    result = cli(store, f"resume={run_dir}", "epochs=3")
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"passing over a damaged checkpoint: {optimizer} has 100 bytes, {size} when saved" in result.stdout
    assert f"resumed {run_dir / 'checkpoints' / 'epoch_00001'} at epoch 1" in result.stdout
    assert steps(store) == [1, 2, 3]  # epoch 2 recomputed from epoch 1, not logged twice

    state = run_dir / "checkpoints" / "epoch_00003" / "trainer.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # damaged in place: its size still matches
    result = cli(store, f"resume={run_dir}", "epochs=4")
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"pcpo-train: checkpoint {state.parent} does not load (")
    assert f"delete it to resume from an older one in {state.parent.parent}" in result.stdout
    assert "Traceback" not in result.stdout

    for checkpoint in (run_dir / "checkpoints").glob("epoch_*"):
        (checkpoint / "trainer.pt").write_bytes(b"")
    start = time.monotonic()
    result = cli(store, f"resume={run_dir}", "epochs=4")
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    damaged = run_dir / "checkpoints" / "epoch_00003" / "trainer.pt"
    assert f"resume={str(run_dir)!r}: no intact checkpoint ({damaged} has 0 bytes, " in result.stdout
    assert "restore the file or start a new run" in result.stdout and "Traceback" not in result.stdout
    print(f"no intact checkpoint: refused in {elapsed:.1f} s")


# ------------------------------------------------------------------------------ Ctrl-C


@pytest.mark.integration
def test_ctrl_c_checkpoints_the_epoch_and_a_bare_resume_continues_the_run_as_it_was(tmp_path: Path) -> None:
    """A GRPO run of 6 epochs, Ctrl-C'd: `resume=<dir>` alone brings back GRPO, the tiny settings and 6 epochs."""
    store, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    process = cli(store, *TINY, "algorithm=grpo", "epochs=6", "checkpoint_every=0", "log_images_every=0",
                  f"hydra.run.dir={run_dir}", wait=False)
    wait_for(lambda: in_log(run_dir, "epoch 2/6"), "epoch 2")
    process.send_signal(2)  # SIGINT, as Ctrl-C sends it
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    (checkpoint,) = (run_dir / "checkpoints").glob("epoch_*")
    stopped_at = int(checkpoint.name.split("_")[1])
    assert 2 <= stopped_at < 6
    assert f"stopped by SIGINT after epoch {stopped_at}; continue it with: pcpo-train resume={run_dir}" in output
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    assert run.info.status == "KILLED"

    result = cli(store, f"resume={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "epoch 6/6" in result.stdout
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert steps(store) == [1, 2, 3, 4, 5, 6]
    assert run.data.tags["resume_1_overrides"] == f"resume={run_dir}"
    assert run.data.params["algorithm.objective"] == "ratio"
    (resumed,) = (run_dir / ".hydra").glob("resumed_*/config.yaml")
    config = OmegaConf.load(resumed)  # what the resume ran with, not the defaults Hydra composed
    assert config.algorithm.objective == "ratio" and config.epochs == 6 and config.sampler.num_steps == 3


SLOW_STOP = """
import time
import pcpo_hydra.loop as loop

checked_stop = loop.Trainer.maybe_stop

def maybe_stop_slowly(self, epoch):
    if self.stop.signum is not None:  # after the first Ctrl-C: the second one comes meanwhile
        time.sleep(120)
    return checked_stop(self, epoch)

loop.Trainer.maybe_stop = maybe_stop_slowly
"""


@pytest.mark.integration
def test_a_second_ctrl_c_stops_at_once_in_one_line_and_marks_the_run_killed(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SLOW_STOP)  # the epoch-end check waits for the second Ctrl-C
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    store, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    process = cli(store, *TINY, "epochs=100", "checkpoint_every=1", "log_images_every=0",
                  f"hydra.run.dir={run_dir}", wait=False, env={"PYTHONPATH": pythonpath})
    wait_for(lambda: in_log(run_dir, "epoch 2/100"), "epoch 2")
    process.send_signal(2)
    wait_for(lambda: in_log(run_dir, "received SIGINT: stopping after this epoch"), "the first Ctrl-C noted")
    start = time.monotonic()
    process.send_signal(2)
    output, _ = process.communicate(timeout=300)
    elapsed = time.monotonic() - start
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("pcpo-train: interrupted; continue from epoch_000")
    assert last.endswith(f"with: pcpo-train resume={run_dir}")
    _, run = only_run(MlflowClient(f"sqlite:///{store}"))
    assert run.info.status == "KILLED"
    assert elapsed < 60  # at once, not after the 120 s the epoch's end would have taken
    print(f"second Ctrl-C: exited in {elapsed:.1f} s")
