"""Algorithms are pluggable: an outside method trains through the real run with no edit to the loop."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pcpo_hydra.algorithms.steps import trained_steps
from pcpo_hydra.callbacks import Callback
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.registry import group_schemas

PLUGINS = Path(__file__).parent / "plugins"
# The tiny models' recipe (conf/recipe/tiny_cpu.yaml) sets the clipped method's clip_range, a key rwr lacks.
RWR = ["algorithm=rwr", f"hydra.searchpath=[file://{PLUGINS / 'rwr_algorithm' / 'conf'}]", "~algorithm.clip_range"]
TINY = ["experiment=debug", "sampler.num_steps=2", "hardware.num_threads=1", "log_images_every=0"]


@pytest.fixture
def rwr_on_path(monkeypatch) -> Iterator[None]:
    """The plugin package importable as any installed one would be; it and its schema gone after the test."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    registered = group_schemas()["algorithm"]
    before = dict(registered)
    yield
    registered.clear()
    registered.update(before)
    for name in [name for name in sys.modules if name.split(".")[0] == "rwr_algorithm"]:
        del sys.modules[name]


class Watcher(Callback):
    """Snapshots the weights before training and records each epoch's metrics as the loop hands them over."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.metrics: dict[int, dict[str, float]] = {}
        self.algorithm = None

    def maybe_evaluate(self, trainer, epoch: int) -> dict[str, float]:
        if epoch == 0:
            self.before = [p.detach().clone() for p in trainer.parts.model.trainable_parameters()]
            self.algorithm = trainer.parts.algorithm
        return {}

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.metrics[epoch] = dict(metrics)
        self.after = [p.detach().clone() for p in trainer.parts.model.trainable_parameters()]


def test_the_plugin_schema_checks_its_node_before_anything_is_built(compose_cfg, rwr_on_path) -> None:
    assert validate(compose_cfg(*TINY, *RWR)).algorithm.temperature == 0.5
    with pytest.raises(ConfigError, match=r"algorithm\.temperature.*-1"):
        validate(compose_cfg(*TINY, *RWR, "algorithm.temperature=-1"))


@pytest.mark.integration
def test_an_outside_algorithm_trains_through_the_real_run_with_its_own_update_and_state(
    compose_cfg, rwr_on_path, tmp_path: Path, monkeypatch
) -> None:
    from rwr_algorithm.algorithm import RewardWeightedRegression

    from pcpo_hydra.build import run
    from pcpo_hydra.checkpoint import TRAINER_STATE, latest_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = validate(compose_cfg(*TINY, *RWR, "epochs=2", "checkpoint_every=1", f"text_cache_dir={tmp_path / 'cache'}"))
    watcher = Watcher()
    run(cfg, tmp_path / "run", {"algorithm": "rwr"}, [], {"job": "plugin"}, callbacks=[watcher])

    assert isinstance(watcher.algorithm, RewardWeightedRegression)
    samples = cfg.rollout.prompts_per_epoch * cfg.rollout.group_size
    pairs = samples * trained_steps(cfg.sampler.num_steps, cfg.train.timestep_fraction) * cfg.train.inner_epochs
    for epoch, metrics in watcher.metrics.items():
        assert metrics["train/rwr_pairs"] == pairs  # its update visited every (sample, trained step)
        # the backward count the accelerator was built for: one optimizer step per configured update
        assert metrics["train/rwr_optimizer_steps"] == cfg.train.num_updates * cfg.train.inner_epochs
        assert math.isfinite(metrics["train/rwr_loss"]) and metrics["train/rwr_loss"] != 0.0
        assert metrics["train/rwr_weight_max"] > 1.0  # exp(A / T) of the best sample, A > 0
        assert "train/clipfrac" not in metrics  # the clipped method's update never ran
        # its advantages are reward - mean (no std), as the loop logged them
        mean, low, high = (metrics[f"rollout/reward_{s}"] for s in ("mean", "min", "max"))
        assert metrics["rollout/advantage_mean"] == pytest.approx(0.0, abs=1e-6)
        assert metrics["rollout/advantage_abs_max"] == pytest.approx(max(high - mean, mean - low), rel=1e-5)
    assert sorted(watcher.metrics) == [1, 2]
    moved = sum(float((a - b).abs().sum()) for a, b in zip(watcher.after, watcher.before))
    assert moved > 0.0

    client = MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    assert logged.info.status == "FINISHED" and logged.data.tags["algorithm"] == "rwr"
    history = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, "train/rwr_loss")}
    assert history == {epoch: pytest.approx(m["train/rwr_loss"]) for epoch, m in watcher.metrics.items()}
    state = torch.load(latest_checkpoint(tmp_path / "run") / TRAINER_STATE, weights_only=False)
    assert state["epoch"] == 2 and state["algorithm"] == {"updates": 2}
