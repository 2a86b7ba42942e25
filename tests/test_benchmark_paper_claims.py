"""benchmarks/paper_claims.py: its analysis on known curves, and one tiny end-to-end benchmark."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def claims():
    yield from benchmark_module("paper_claims")


def record(claims, arm: str, evals: list[float], every: int = 2):
    """A run evaluated at epochs 0 (the base model), every, 2 x every, ..."""
    epochs = (len(evals) - 1) * every
    return claims.RunRecord("ddim", arm, 0, reward=[evals[-1]] * epochs, clipfrac=[0.0] * epochs,
                            diversity=[0.1] * epochs, eval_epochs=[k * every for k in range(len(evals))],
                            drift=[0.0] * len(evals), eval_reward=evals, caption_agreement=[0.9] * len(evals))


def test_a_target_is_reached_when_the_moving_average_of_evaluations_gets_there(claims) -> None:
    assert claims.smoothed([0.0, 0.3, 0.6, 0.9]) == pytest.approx([0.0, 0.15, 0.45, 0.75])
    run = record(claims, "pcpo", [0.5, 0.0, 0.6, 0.6, 0.9, 0.9])  # epochs 0, 2, 4, 6, 8, 10
    # The base model's 0.5 at epoch 0 never counts; trained points average as (0.0, 0.3, 0.6, 0.75, 0.9).
    assert claims.epochs_to_reach(run, 0.3) == 4
    assert claims.epochs_to_reach(run, 0.6) == 6   # the single 0.6 at epoch 4 is not enough
    assert claims.epochs_to_reach(run, 0.95) is None


def test_targets_lie_between_the_base_reward_and_the_best_arms_final_evaluations(claims) -> None:
    slow = record(claims, "grpo", [0.1, 0.1, 0.2, 0.4, 0.4, 0.4])
    fast = record(claims, "pcpo", [0.1, 0.3, 0.8, 0.7, 0.8, 0.9])
    # base: 0.1 at epoch 0; best final: pcpo's mean of its last 3 evaluations, 0.8 -> 0.1 + q * 0.7
    assert claims.targets([slow, fast]) == pytest.approx([0.45, 0.625, 0.73])
    # Costs at equal reward: read where each run first reaches the 50% target (fast at epoch 4, slow never).
    fast.caption_agreement = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert claims.at_target("pcpo", [fast], 0.45) == "pcpo caption agreement 0.700, drift 0.000, diversity 0.100 (1/1 runs)"
    assert claims.at_target("grpo", [slow], 0.45) == "grpo never"
    # No arm above the base model: no targets (every run would "reach" one below its start).
    worse = record(claims, "pcpo", [0.5, 0.4, 0.4, 0.4])
    assert claims.targets([worse]) == []
    report = "\n".join(claims.setting_report("ddim", [worse], ["pcpo"]))
    assert "above the base model's (0.500): no targets" in report and "| pcpo | 0.400 ± 0.000 |" in report


def timed(claims, arm: str, seed: int, evals: list[float], seconds_per_epoch: float):
    run = record(claims, arm, evals)
    run.seed = seed
    run.train_seconds = [seconds_per_epoch * (k + 1) for k in range(len(run.reward))]
    run.rollout_seconds, run.update_seconds = [0.6 * seconds_per_epoch] * len(run.reward), [0.4 * seconds_per_epoch] * len(run.reward)
    run.network_rows = {"rollout": 640, "update": 640 if arm == "grpo" else 192}
    return run


def test_time_to_target_counts_the_seeds_that_never_reach_it(claims) -> None:
    # evaluations at epochs 0, 2, ..., 10; the 50% target 0.5 is reached where the 2-point average gets there
    never = timed(claims, "grpo", 0, [0.0, 0.1, 0.1, 0.2, 0.2, 0.2], 3.0)
    assert claims.time_to(never, 0.5) == (10, 30.0, False)  # censored at its last epoch, not dropped
    late = timed(claims, "grpo", 1, [0.0, 0.2, 0.4, 0.6, 0.6, 0.6], 3.0)
    assert claims.time_to(late, 0.5) == (6, 18.0, True)
    # Kaplan-Meier: 3 of 5 reached (at 6, 8, 10 s); the median is the time at which S drops to <= 0.5
    assert claims.median_time([6.0, 8.0, 10.0, 20.0, 20.0], [True, True, True, False, False]) == (10.0, 20.0)
    # 2 of 5 reached: the median lies beyond the longest time observed; averaging the two that did would say 7
    assert claims.median_time([6.0, 8.0, 20.0, 20.0, 20.0], [True, True, False, False, False]) == (None, 20.0)


def test_the_speed_up_is_the_ratio_of_median_seconds_with_an_interval_and_bounds(claims) -> None:
    fast = [(4, 4.0, True)] * 5
    slow = [(6, 18.0, True)] * 5
    assert claims.speedup(slow, fast) == "4.50x [4.50, 4.50]"
    censored = [(10, 30.0, False)] * 3 + [(6, 18.0, True)] * 2  # GRPO's median is beyond 30 s: a lower bound
    assert claims.speedup(censored, fast).startswith(">7.50x")
    assert claims.speedup(censored, censored) == "neither reaches it in half the seeds"
    grpo = [timed(claims, "grpo", k, [0.0, 0.1, 0.2, 0.4, 0.6, 0.6], 3.0) for k in range(5)]
    window = [timed(claims, "pcpo_window", k, [0.0, 0.4, 0.6, 0.7, 0.7, 0.7], 1.0) for k in range(5)]
    report = "\n".join(claims.speed_report("ddim", grpo + window, ["grpo", "pcpo_window"]))
    # targets from base 0.0 to the window arm's final 0.7: 0.35, 0.525, 0.63; grpo's 2-point average reaches 0.35 at
    # epoch 8 (24 s), the window arm's first evaluation (0.4) at epoch 2 (2 s): 12x in wall-clock, 4x in epochs
    assert "| grpo | 1.80 + 1.20 | 640 + 640 | 8 (5/5) | 10 (5/5) | > 10 (0/5) | 24 (5/5) |" in report
    assert "| pcpo_window | 0.60 + 0.40 | 640 + 192 | 2 (5/5) | 6 (5/5) | 6 (5/5) | 2 (5/5) |" in report
    assert "| 2 (5/5) | 6 (5/5) | 6 (5/5) | 12.00x [12.00, 12.00] |" in report
    assert "> 30 (0/5)" in report  # grpo never reaches the 90% target: censored, shown as a bound


def test_later_overrides_replace_earlier_ones_of_the_same_key(claims) -> None:
    merged = claims.combine(["model=world_sd", "reward=world_all"], ["algorithm=grpo"], ["model=tiny_sd"])
    assert merged == ["model=tiny_sd", "reward=world_all", "algorithm=grpo"]


def test_a_runs_fingerprint_follows_its_config_and_base_model_files_but_not_threads(claims, tmp_path: Path) -> None:
    import argparse

    folder = tmp_path / "sd"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "weights.bin"
    weights.write_bytes(b"base model")

    def key(arm: str, *overrides: str) -> str:
        args = argparse.Namespace(epochs=30, eval_every=2, eval_prompts=8,
                                  overrides=[f"model.pretrained={folder}", *overrides])
        return claims.fingerprint(claims.run_config("ddim", claims.ARMS[arm], 0, args), args)

    first = key("pcpo")
    assert key("+proportional") == first != key("grpo")  # the ladder's last rung is PCPO itself
    assert key("pcpo", "hardware.num_threads=1") == first
    weights.write_bytes(b"pretrained again")
    assert key("pcpo") != first


@pytest.mark.integration
def test_a_tiny_benchmark_writes_its_table_plots_and_mlflow_runs(claims, tmp_path: Path, monkeypatch,
                                                                metric_weights) -> None:
    pytest.importorskip("matplotlib")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    torch_hub, dinov2 = metric_weights
    claims.main(["--settings", "ddim", "--seeds", "2", "--epochs", "3", "--eval-every", "2", "--eval-prompts", "2",
                 "--out", str(out), "--fidelity", "--torch-hub", str(torch_hub), "--dinov2", str(dinov2),
                 "model=tiny_sd", "experiment=debug", "sampler.num_steps=3", "hardware.num_threads=1"])
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

    # --fidelity: pcpo-eval's metrics on each run's saved evaluation images, against its epoch-0 (base) images
    fidelity = claims.fidelity_metrics(argparse.Namespace(torch_hub=str(torch_hub), dinov2=str(dinov2)))
    for record in map(lambda r: claims.RunRecord(**r), records):
        assert record.eval_group == 2  # experiment=debug's group size: 2 prompts x 2 images
        fid, fd_dinov2, lpips = claims.fidelity_at(record, 0, fidelity)
        assert abs(fid) < 1e-3 and abs(fd_dinov2) < 1e-3 and lpips > 0  # the base images against themselves
        fid, fd_dinov2, lpips = claims.fidelity_at(record, 3, fidelity)
        assert fid > 1e-3 and fd_dinov2 > 1e-3 and lpips > 0
    line = claims.at_target("pcpo", [claims.RunRecord(**r) for r in records if r["arm"] == "pcpo"], -1e9, fidelity)
    assert ", FID " in line and ", FD-DINOv2 " in line and "(2 with images)" in line

    # The same runs asked for again (other arm order) are reused from --out, not trained again.
    claims.main(["--settings", "ddim", "--seeds", "2", "--epochs", "3", "--eval-every", "2", "--eval-prompts", "2",
                 "--arms", "pcpo,grpo", "--out", str(out), "model=tiny_sd", "experiment=debug",
                 "sampler.num_steps=3", "hardware.num_threads=1"])
    again = json.loads((out / "records.json").read_text())
    assert [(r["arm"], r["seed"]) for r in again] == [("pcpo", 0), ("grpo", 0), ("pcpo", 1), ("grpo", 1)]
    assert {(r["arm"], r["seed"]): r["reward"] for r in again} == {(r["arm"], r["seed"]): r["reward"] for r in records}
    runs = client.search_runs([client.get_experiment_by_name(claims.EXPERIMENT).experiment_id])
    assert len([r for r in runs if "arm" in r.data.tags]) == 4 and len(runs) == 6  # only a second summary run


@pytest.mark.integration
def test_a_tiny_speed_benchmark_times_every_arm_and_plots_reward_against_seconds(claims, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    claims.main(["--speed", "--settings", "ddim", "--seeds", "2", "--epochs", "3", "--eval-every", "1",
                 "--eval-prompts", "2", "--out", str(out), "model=tiny_sd", "experiment=debug",
                 "sampler.num_steps=4", "hardware.num_threads=1"])
    records = [claims.RunRecord(**r) for r in json.loads((out / "records.json").read_text())]
    assert [r.arm for r in records] == list(claims.SPEED) * 2
    for run in records:
        assert len(run.train_seconds) == 3 and all(b > a >= 0 for a, b in zip([0.0] + run.train_seconds, run.train_seconds))
    rows = {r.arm: r.network_rows for r in records}
    # experiment=debug: 2 prompts x 2 images, 4 steps at guidance 5; the window stores 3 of them
    assert rows == {"grpo": {"rollout": 32, "update": 32}, "pcpo": {"rollout": 32, "update": 32},
                    "pcpo_window": {"rollout": 32, "update": 24}, "pcpo_window_nocfg": {"rollout": 16, "update": 12}}
    report = (out / "report.md").read_text()
    assert "### ddim: time to target (2 seeds;" in report or "### ddim: time to target" in report
    assert "| pcpo_window_nocfg | " in report and "speed-up to 50% over grpo (seconds)" in report
    assert (out / "ddim_seconds.png").stat().st_size > 10_000
