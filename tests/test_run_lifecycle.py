"""An MLflow run's life: unique names, resume tags, runs left RUNNING closed later, grids logged before metrics."""

from __future__ import annotations

import os
import random
import subprocess
from types import SimpleNamespace

import torch
from mlflow import MlflowClient

from pcpo_hydra.loop import Trainer
from pcpo_hydra.tracking import HOST_TAG, PID_TAG, STALE_TAG, MLflowTracker, process_namespace

EXPERIMENT = "lifecycle"


def test_runs_with_the_same_seed_get_different_names_and_the_seeded_stream_is_untouched(store: str) -> None:
    names = []
    for _ in range(3):
        random.seed(0)  # as seed_everything does before the tracker starts
        expected = random.random()
        random.seed(0)
        tracker = MLflowTracker(store, EXPERIMENT, run_name=None)
        run_id = tracker.start(None, {"seed": "0"}, {})
        assert random.random() == expected  # training's stream continues as seeded
        names.append(MlflowClient(store).get_run(run_id).info.run_name)
        tracker.end()
    assert len(set(names)) == 3, names


def test_each_resume_records_its_overrides_under_the_next_number(store: str) -> None:
    tracker = MLflowTracker(store, EXPERIMENT)
    run_id = tracker.start(None, {}, {})
    tracker.end("KILLED")
    keys = []
    for overrides in (["resume=/r", "epochs=20"], []):
        tracker.start(run_id, {}, {})
        keys.append(tracker.tag_resume(overrides))
        tracker.end("KILLED")
    tags = MlflowClient(store).get_run(run_id).data.tags
    assert keys == ["resume_1_overrides", "resume_2_overrides"]
    assert tags["resume_1_overrides"] == "resume=/r epochs=20" and tags["resume_2_overrides"] == "(none)"


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_start_closes_runs_left_running_in_its_run_dir_or_by_a_dead_process_of_this_host(store: str) -> None:
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    here = {HOST_TAG: process_namespace()}
    left = {  # runs never ended, as a kill -9 leaves them
        name: client.create_run(experiment, tags={"run_dir": run_dir, PID_TAG: str(pid), **host}).info.run_id
        for name, run_dir, pid, host in [
            ("dead_process", "/runs/a", dead_pid(), here), ("same_run_dir", "/runs/mine", os.getpid(), here),
            ("alive_elsewhere", "/runs/b", os.getpid(), here),
            ("dead_pid_other_host", "/runs/c", dead_pid(), {HOST_TAG: "another machine"}),
        ]
    }

    now = MLflowTracker(store, EXPERIMENT)
    run_id = now.start(None, {}, {"run_dir": "/runs/mine"})
    status = {name: client.get_run(rid).info.status for name, rid in left.items()}
    assert status == {"dead_process": "KILLED", "same_run_dir": "KILLED", "alive_elsewhere": "RUNNING",
                      "dead_pid_other_host": "RUNNING"}
    assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(left["same_run_dir"]).data.tags[STALE_TAG] == (
        f"its run dir /runs/mine was taken over by run {run_id}")
    assert client.get_run(left["dead_process"]).data.tags[STALE_TAG].endswith(
        f"on this host had ended when run {run_id} started")
    for rid in (left["alive_elsewhere"], left["dead_pid_other_host"], run_id):
        client.set_terminated(rid, "FINISHED")


class CallOrder:
    """A tracker that only records which logging calls came, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.calls.append(("metrics", step))

    def log_image_grid(self, images, captions, step: int) -> None:
        self.calls.append(("grid", step))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.calls.append(("answers", int(artifact_file.removesuffix(".json").rsplit("_", 1)[1])))


def test_an_epochs_grid_is_logged_before_its_metrics_so_a_kill_between_them_loses_neither() -> None:
    """Resume re-logs epochs after the last logged reward: a grid (and a VLM reward's answers) logged first is
    at worst repeated."""
    tracker = CallOrder()
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(is_main_process=True), tracker=tracker, logged_through=1,
        cfg=SimpleNamespace(epochs=3, log_images_every=1),
        timings={"epoch": 1.0, "rollout": 0.5, "reward": 0.1, "update": 0.4},
        answers=[],
    )
    traj = SimpleNamespace(prompts=["a cat"] * 2, rewards=torch.zeros(2), images=torch.zeros(2, 3, 8, 8))
    metrics = {"rollout/reward_mean": 0.0, "rollout/reward_std": 0.0}
    for epoch in (1, 2, 3):
        trainer.answers = [("a cat", "a cat", 0.9)] if epoch == 3 else []  # a text-reading reward's, from epoch 3
        Trainer.log_epoch(trainer, epoch, metrics, traj)
    # epoch 1 was logged before
    assert tracker.calls == [("grid", 2), ("metrics", 2), ("grid", 3), ("answers", 3), ("metrics", 3)]
