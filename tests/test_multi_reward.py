"""reward=multi: the weighted sum, its parts, nested validation, and what the loop logs of each part."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pcpo_hydra.build import build
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.loop import reward_stats
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from pcpo_hydra.rewards.multi import MultiReward

# Both components offline: the shipped default mixes HPS v2.1 and CLIPScore, which need weights.
JPEG_PARTS = ("reward=multi", "reward@reward.components.hps=jpeg_compressibility",
              "reward@reward.components.clip=jpeg_incompressibility")


class Fixed(BaseReward):
    """Returns given values, so sums and NaN handling can be checked exactly."""

    name = "fixed"

    def __init__(self, values: list[float]) -> None:
        super().__init__(batch_size=2)
        self.values = torch.tensor(values)
        self.seen = 0

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        out = self.values[self.seen:self.seen + len(prompts)]
        self.seen += len(prompts)
        return out


def images(n: int) -> Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))


def test_the_total_is_the_weighted_sum_and_each_part_is_returned() -> None:
    reward = MultiReward({"a": Fixed([1.0, 2.0, 3.0]), "b": Fixed([10.0, 20.0, 30.0])}, {"a": 2.0, "b": -0.5})
    total, parts = reward.score_parts(images(3), ["x", "y", "z"])
    assert total.tolist() == [2 - 5, 4 - 10, 6 - 15]
    assert parts["a"].tolist() == [1.0, 2.0, 3.0] and parts["b"].tolist() == [10.0, 20.0, 30.0]


def test_real_components_sum_to_their_own_scores() -> None:
    x, prompts = images(5), ["p"] * 5
    small, large = JpegCompressibility(batch_size=2)(x, prompts), JpegIncompressibility()(x, prompts)
    total = MultiReward({"c": JpegCompressibility(batch_size=2), "i": JpegIncompressibility()}, {"c": 1.0, "i": 0.25})(
        x, prompts
    )
    torch.testing.assert_close(total, small + 0.25 * large, rtol=0, atol=1e-6)


def test_a_nan_part_makes_only_its_samples_total_nonfinite() -> None:
    reward = MultiReward({"a": Fixed([1.0, float("nan"), 3.0]), "b": Fixed([1.0, 1.0, float("inf")])},
                         {"a": 1.0, "b": 1.0})
    total, parts = reward.score_parts(images(3), ["x", "y", "z"])
    assert total[0] == 2.0 and math.isnan(total[1]) and math.isinf(total[2])
    stats = reward_stats("reward/a", parts["a"])
    assert stats["reward/a_mean"] == 2.0 and stats["reward/a_nonfinite"] == 1.0
    assert stats["reward/a_min"] == 1.0 and stats["reward/a_max"] == 3.0 and stats["reward/a_std"] == 1.0


def test_reward_stats_of_all_failed_samples_are_nan_not_an_error() -> None:
    stats = reward_stats("rollout/reward", torch.full((4,), float("nan")))
    assert math.isnan(stats["rollout/reward_mean"]) and math.isnan(stats["rollout/reward_max"])
    assert stats["rollout/reward_nonfinite"] == 4.0


def test_weights_must_name_exactly_the_components() -> None:
    with pytest.raises(ValueError, match=r"exactly the components \['a', 'b'\], got \['a'\]"):
        MultiReward({"a": Fixed([1.0]), "b": Fixed([1.0])}, {"a": 1.0})
    with pytest.raises(ValueError, match="needs at least one component"):
        MultiReward({}, {})


def test_the_config_composes_validates_and_builds_each_component(compose_cfg) -> None:
    cfg = validate(compose_cfg(*JPEG_PARTS, "+reward@reward.components.third=jpeg_compressibility",
                               "+reward.weights.third=0.5", "reward.components.third.quality=50"))
    reward = build(cfg.reward)
    assert isinstance(reward, MultiReward)
    assert {k: type(v) for k, v in reward.components.items()} == {
        "hps": JpegCompressibility, "clip": JpegIncompressibility, "third": JpegCompressibility,
    }
    assert reward.weights == {"hps": 1.0, "clip": 0.01, "third": 0.5}
    assert reward.components["third"].quality == 50


def test_the_shipped_default_mixes_hps_and_clipscore(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=multi"))
    targets = {name: node._target_.rsplit(".", 1)[-1] for name, node in cfg.reward.components.items()}
    assert targets == {"hps": "HPSv2Score", "clip": "ClipScore"}


def test_nested_problems_are_reported_with_their_full_keys(compose_cfg) -> None:
    cfg = compose_cfg(*JPEG_PARTS, "reward.components.hps.quality=0", "+reward.weights.extra=1.0",
                      "+reward.components.clip.colour=red")
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    problems = "\n".join(caught.value.problems)
    assert "reward.components.hps.quality=0: must be a number in [1, 100]" in problems
    assert "reward.components.clip.colour" in problems
    assert "reward.weights=" in problems and "must name exactly the components ['clip', 'hps']" in problems


def test_a_component_with_an_unknown_target_is_named(compose_cfg) -> None:
    cfg = compose_cfg(*JPEG_PARTS, "reward.components.hps._target_=nowhere.Reward")
    with pytest.raises(ConfigError, match=r"reward.components.hps._target_='nowhere.Reward': must be one of"):
        validate(cfg)


def test_an_empty_multi_is_a_config_error(compose_cfg) -> None:
    cfg = compose_cfg(*JPEG_PARTS, "~reward@reward.components.hps", "~reward@reward.components.clip",
                      "~reward.weights.hps", "~reward.weights.clip")
    with pytest.raises(ConfigError, match="reward.components: is empty"):
        validate(cfg)


@pytest.mark.integration
def test_a_training_epoch_logs_every_part_beside_the_total(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from test_training import only_run, pcpo_train

    store = tmp_path / "mlflow.db"
    pcpo_train(store, *JPEG_PARTS, "reward.weights.clip=0.5", f"hydra.run.dir={tmp_path / 'run'}")
    _, run = only_run(MlflowClient(f"sqlite:///{store}"))
    metrics = run.data.metrics
    for name in ("hps", "clip"):
        assert metrics[f"reward/{name}_min"] <= metrics[f"reward/{name}_mean"] <= metrics[f"reward/{name}_max"]
        assert metrics[f"reward/{name}_nonfinite"] == 0
    # JPEG compressibility is minus incompressibility: the total is (1 - 0.5) x compressibility.
    assert metrics["reward/hps_mean"] == pytest.approx(-metrics["reward/clip_mean"], rel=1e-6)
    assert metrics["rollout/reward_mean"] == pytest.approx(0.5 * metrics["reward/hps_mean"], rel=1e-5)
    assert run.data.tags["reward"] == "multi"
