"""benchmarks/sdpo.py stays runnable: every arm trains, is evaluated at each step count, and is reported."""

from __future__ import annotations

import pytest

from conftest import benchmark_module

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sdpo_benchmark():
    yield from benchmark_module("sdpo")


def test_each_arm_is_evaluated_at_every_step_count_from_the_same_base(sdpo_benchmark, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    curves = sdpo_benchmark.main(["--seeds", "0", "--epochs", "2", "--eval-every", "1", "--eval-steps", "1", "3",
                                  "--out", str(tmp_path), "hardware.num_threads=1", "sampler.num_steps=3",
                                  f"text_cache_dir={tmp_path / 'cache'}"])
    assert [c.arm for c in curves] == ["grpo", "pcpo", "sdpo", "sdpo_one_slot"]
    for curve in curves:
        assert curve.epochs == [0, 1, 2]
        assert sorted(curve.rewards) == ["1", "3"] and all(len(v) == 3 for v in curve.rewards.values())
    # same seed, same base model, same held-out prompts and noise: the untrained evaluations agree
    assert len({c.rewards["1"][0] for c in curves}) == 1 and len({c.rewards["3"][0] for c in curves}) == 1
    assert len({c.rewards["1"][-1] for c in curves}) == 4  # and training moved each arm its own way
    lines = sdpo_benchmark.report(curves, [1, 3])
    assert lines[0].startswith("| arm | seeds |") and [line.split("|")[1].strip() for line in lines[2:]] == \
        ["grpo", "pcpo", "sdpo", "sdpo_one_slot"]
    assert (tmp_path / "curves.json").is_file()
