"""Spawned ranks and their launcher: a Ctrl-C reaches each rank once, and a kill -9 of the launcher ends them."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from test_resume import cli, in_log, wait_for
from test_training import TINY, only_run

pytestmark = pytest.mark.integration

TWO_RANKS = [*TINY, "hardware.processes_per_node=2", "checkpoint_every=0", "log_images_every=0"]


def ranks_of(launcher: int) -> list[psutil.Process]:
    return [child for child in psutil.Process(launcher).children()
            if "spawn_main" in " ".join(child.cmdline())]  # not the resource tracker


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_of_the_launcher_ends_its_ranks_within_seconds_without_a_checkpoint(tmp_path: Path) -> None:
    """Killed, not stopped: ranks that finished their epoch and saved a checkpoint would race a resume.

    (torch's spawn arms a parent-death SIGINT, which a rank takes for a Ctrl-C and stops gracefully on.)
    """
    run_dir = tmp_path / "run"
    launcher = cli(tmp_path / "mlflow.db", *TWO_RANKS, "epochs=1000", f"hydra.run.dir={run_dir}", wait=False)
    try:
        wait_for(lambda: in_log(run_dir, "epoch 1/1000"), "a first epoch")  # the ranks are training
        ranks = ranks_of(launcher.pid)
        assert len(ranks) == 2
    finally:
        launcher.kill()
    start = time.monotonic()
    wait_for(lambda: not any(alive(rank) for rank in ranks), "end of the orphaned ranks", timeout=3)
    print(f"ranks gone {time.monotonic() - start:.2f} s after the kill -9")
    launcher.communicate(timeout=60)
    assert not (run_dir / "checkpoints").exists()


def test_ctrl_c_to_the_launcher_stops_both_ranks_after_the_epoch_with_a_checkpoint(tmp_path: Path) -> None:
    store, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    launcher = cli(store, *TWO_RANKS, "epochs=1000", f"hydra.run.dir={run_dir}", wait=False)
    wait_for(lambda: in_log(run_dir, "epoch 2/1000"), "epoch 2")
    launcher.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches it: the ranks are in their own group
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    (checkpoint,) = (run_dir / "checkpoints").glob("epoch_*")
    assert f"stopped by SIGINT after epoch {int(checkpoint.name.split('_')[1])}; continue it with" in output
    _, run = only_run(MlflowClient(f"sqlite:///{store}"))
    assert run.info.status == "KILLED"
