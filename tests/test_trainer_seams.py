"""The trainer's seams: the Tracker protocol and its no-op tracker, and the callbacks the loop calls."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pcpo_hydra.callbacks import Callback
from pcpo_hydra.config import validate
from pcpo_hydra.tracker import NullTracker, Tracker
from pcpo_hydra.tracking import MLflowTracker

TINY = ["experiment=debug", "sampler.num_steps=2", "hardware.num_threads=1", "checkpoint_every=0", "log_images_every=0"]
PROTOCOL = [name for name in vars(Tracker) if not name.startswith("_")]


def test_mlflow_and_null_trackers_have_every_tracker_method_with_its_parameters() -> None:
    assert sorted(PROTOCOL) == ["end", "last_logged_step", "log_artifact", "log_image_grid", "log_metrics",
                                "log_text", "run_id", "start", "tag_resume"]
    for name in PROTOCOL:
        if name == "run_id":
            continue
        expected = list(inspect.signature(getattr(Tracker, name)).parameters)
        for tracker in (MLflowTracker, NullTracker):
            assert list(inspect.signature(getattr(tracker, name)).parameters) == expected, (tracker, name)
    null = NullTracker()
    assert null.run_id is None and null.start(None, {}, {}) is None and null.last_logged_step("x") is None


class Recorder(Callback):
    """Evaluates at epoch 0 and every second epoch; notes every hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def maybe_evaluate(self, trainer, epoch: int) -> dict[str, float]:
        self.calls.append(("evaluate", epoch))
        return {"eval/score": 10.0 + epoch} if epoch % 2 == 0 else {}

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.calls.append(("epoch_end", epoch, metrics.get("eval/score"), "rollout/reward_mean" in metrics))


@pytest.mark.integration
def test_run_calls_the_callbacks_logs_their_evaluations_and_restores_the_signal_handlers(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    from pcpo_hydra.build import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    handler = signal.getsignal(signal.SIGINT)
    recorder = Recorder()
    cfg = validate(compose_cfg(*TINY, "epochs=3", f"text_cache_dir={tmp_path / 'cache'}"))
    run(cfg, tmp_path / "run", {}, [], {"job": "seams"}, callbacks=[recorder])
    assert recorder.calls == [("evaluate", 0), ("evaluate", 1), ("epoch_end", 1, None, True),
                              ("evaluate", 2), ("epoch_end", 2, 12.0, True), ("evaluate", 3), ("epoch_end", 3, None, True)]
    assert signal.getsignal(signal.SIGINT) is handler  # a second run in this process gets Ctrl-C as before
    client = MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    assert logged.info.status == "FINISHED" and logged.data.tags["job"] == "seams"
    assert {m.step: m.value for m in client.get_metric_history(logged.info.run_id, "eval/score")} == {0: 10.0, 2: 12.0}
    assert {m.step for m in client.get_metric_history(logged.info.run_id, "rollout/reward_mean")} == {1, 2, 3}


@pytest.mark.integration
def test_a_trainer_without_tracking_gets_the_null_tracker_and_a_resumed_fit_skips_the_untrained_evaluation(
    compose_cfg, tmp_path: Path
) -> None:
    from pcpo_hydra.build import build_trainer

    recorder = Recorder()
    cfg = validate(compose_cfg(*TINY, "epochs=2", f"text_cache_dir={tmp_path / 'cache'}"))
    trainer = build_trainer(cfg, tmp_path, track=False, callbacks=[recorder])
    assert isinstance(trainer.tracker, NullTracker) and trainer.state_dict()["mlflow_run_id"] is None
    trainer.epoch = 1  # as a resume from epoch 1's checkpoint leaves it
    trainer.fit()
    assert recorder.calls == [("evaluate", 2), ("epoch_end", 2, 12.0, True)]
