"""benchmarks/paper_claims.py: its analysis on known curves, and one tiny end-to-end benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def claims():
    yield from benchmark_module("paper_claims")


def test_a_target_is_reached_when_the_moving_average_gets_there(claims) -> None:
    rewards = [0.0, 0.3, 0.6, 0.9, 0.9, 0.9]
    assert claims.smoothed(rewards) == pytest.approx([0.0, 0.15, 0.3, 0.6, 0.8, 0.9])
    assert claims.epochs_to_reach(rewards, 0.6) == 4  # the single epoch 3 at 0.6 is not enough
    assert claims.epochs_to_reach(rewards, 0.95) is None


def test_targets_lie_between_the_base_reward_and_the_best_arms_final_reward(claims) -> None:
    def run(arm, rewards):
        return claims.RunRecord("ddim", arm, 0, reward=rewards)

    slow, fast = run("grpo", [0.0] * 5 + [0.4] * 5), run("pcpo", [0.2] * 5 + [0.8] * 5)
    # base: mean first epoch 0.1; best final: pcpo's 0.8 -> 0.1 + q * 0.7
    assert claims.targets([slow, fast]) == pytest.approx([0.45, 0.625, 0.73])


def test_later_overrides_replace_earlier_ones_of_the_same_key(claims) -> None:
    merged = claims.combine(["model=world_sd", "reward=world_all"], ["algorithm=grpo"], ["model=tiny_sd"])
    assert merged == ["model=tiny_sd", "reward=world_all", "algorithm=grpo"]


@pytest.mark.integration
def test_a_tiny_benchmark_writes_its_table_plots_and_mlflow_runs(claims, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    claims.main(["--settings", "ddim", "--seeds", "2", "--epochs", "3", "--eval-every", "2", "--eval-prompts", "2",
                 "--out", str(out), "model=tiny_sd", "experiment=debug", "sampler.num_steps=3",
                 "hardware.num_threads=1"])
    report = (out / "report.md").read_text()
    assert "| grpo |" in report and "| pcpo |" in report and "epochs to" in report
    assert (out / "ddim.png").stat().st_size > 10_000
    records = json.loads((out / "records.json").read_text())
    assert [(r["arm"], r["seed"]) for r in records] == [("grpo", 0), ("pcpo", 0), ("grpo", 1), ("pcpo", 1)]
    for record in records:
        assert len(record["reward"]) == len(record["clipfrac"]) == len(record["diversity"]) == 3
        assert record["eval_epochs"] == [0, 2, 3] and record["drift"][0] == 0.0 and record["drift"][-1] > 0.0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(claims.EXPERIMENT).experiment_id])
    trained = [r for r in runs if "arm" in r.data.tags]
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in trained) == [
        ("grpo", "0"), ("grpo", "1"), ("pcpo", "0"), ("pcpo", "1")]
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 5  # + the summary run
    assert {m.step for m in client.get_metric_history(trained[0].info.run_id, "eval/drift")} == {0, 2, 3}
