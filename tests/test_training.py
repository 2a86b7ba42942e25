"""End to end through the real `pcpo-train` command: tiny runs, their MLflow records, and resume."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

EXPERIMENT = "pcpo-hydra"
TINY = [  # the debug preset with a few more steps, so every phase does real work quickly
    "experiment=debug", "sampler.num_steps=3", "rollout.prompts_per_epoch=2", "rollout.group_size=4",
    "rollout.batch_size=8", "train.batch_size=4", "train.num_updates=2", "hardware.num_threads=1",
]
EPOCH_METRICS = {
    "rollout/reward_mean", "rollout/reward_std", "rollout/reward_min", "rollout/reward_max", "rollout/reward_nonfinite",
    "rollout/advantage_mean", "rollout/advantage_std", "rollout/advantage_abs_max",
    "train/loss", "train/policy_loss", "train/clipfrac", "train/approx_kl", "train/grad_norm", "train/lr",
    "time/rollout_s", "time/reward_s", "time/update_s", "perf/images_per_s", "rollout/group_diversity",
    "rollout/flat_groups",
}


def pcpo_train(
    store: Path, *overrides: str, returncode: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the console script's module with a private MLflow store (and `env` added); check its exit status."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "pcpo_hydra.train", *TINY, *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == returncode, result.stderr[-4000:]
    return result


def only_run(client: MlflowClient):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return experiment, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


@pytest.mark.parametrize("algorithm", ["grpo", "pcpo"])
def test_one_epoch_logs_metrics_tags_and_artifacts(tmp_path: Path, algorithm: str) -> None:
    store, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    result = pcpo_train(store, f"algorithm={algorithm}", f"hydra.run.dir={run_dir}")
    assert "epoch 1/1 | reward" in result.stdout

    client = MlflowClient(f"sqlite:///{store}")
    experiment, run = only_run(client)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.status == "FINISHED"
    assert EPOCH_METRICS <= set(run.data.metrics)
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1], key
        assert math.isfinite(history[0].value), key
    metrics = run.data.metrics
    # JPEG compressibility is minus the file size in kB: negative, and ordered min <= mean <= max.
    assert metrics["rollout/reward_min"] <= metrics["rollout/reward_mean"] <= metrics["rollout/reward_max"] < 0
    assert metrics["train/num_updates"] == 2
    assert metrics["train/lr"] == pytest.approx(1e-3)  # the tiny recipe's
    # Group-normalised advantages have mean 0 within every group.
    assert abs(metrics["rollout/advantage_mean"]) < 1e-5

    params, tags = run.data.params, run.data.tags
    assert params["algorithm.objective"] == ("log_hinge" if algorithm == "pcpo" else "ratio")
    assert params["sampler.num_steps"] == "3"
    assert tags["algorithm"] == algorithm and tags["model"] == "tiny_sd" and tags["sampler"] == "ddim"
    assert tags["reward"] == "jpeg_compressibility" and tags["hardware"] == "cpu"
    assert f"algorithm={algorithm}" in tags["overrides"]
    assert tags["run_dir"] == str(run_dir)

    artifacts = artifact_paths(client, run.info.run_id)
    assert "config.yaml" in artifacts
    assert "samples/epoch_00001.png" in artifacts
    assert "weights/diffusion_pytorch_model.safetensors" in artifacts  # the tiny default trains the whole UNet
    assert (run_dir / "checkpoints" / "epoch_00001" / "trainer.pt").is_file()


SLIDING = ["sampler.sde_window.size=1", "sampler.sde_window.placement=sliding"]  # over 3 steps: 0, 1, 2, 0, 1


# SDPO: 2 of 3 prompts an epoch, 4 samples each, so its per-(prompt, step) statistics take over by epoch 3
SDPO = ["algorithm=sdpo", "algorithm.stat_min_count=6", "prompts=list"]


@pytest.mark.parametrize("window", [[], SLIDING, SDPO], ids=["full", "sliding_window", "sdpo"])
def test_resume_continues_the_same_run_without_duplicate_or_missing_epochs(tmp_path: Path, window) -> None:
    """A run stopped after 3 epochs (checkpoint at 2) and resumed to 5 equals one straight 5-epoch run."""
    client_of = lambda store: MlflowClient(f"sqlite:///{store}")  # noqa: E731
    common = ["checkpoint_every=2", "keep_checkpoints=5", "log_images_every=0", *window]

    straight_store = tmp_path / "straight.db"
    pcpo_train(straight_store, *common, "epochs=5", f"hydra.run.dir={tmp_path / 'straight'}")
    straight_client = client_of(straight_store)
    _, straight = only_run(straight_client)
    reference = {m.step: m.value for m in straight_client.get_metric_history(straight.info.run_id, "rollout/reward_mean")}

    store, run_dir = tmp_path / "resumed.db", tmp_path / "resumed"
    pcpo_train(store, *common, "epochs=3", f"hydra.run.dir={run_dir}")
    first_config = (run_dir / ".hydra" / "config.yaml").read_text()
    result = pcpo_train(store, *common, "epochs=5", f"resume={run_dir}")
    assert "epoch 3/5" in result.stdout  # epoch 3 is recomputed from the epoch-2 checkpoint ...

    client = client_of(store)
    _, run = only_run(client)  # ... into the same MLflow run
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "rollout/reward_mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # ... and logged once
    for metric in history:  # weights, optimizer and RNG streams all continued exactly
        assert metric.value == pytest.approx(reference[metric.step], rel=1e-6), metric.step
    assert (run_dir / ".hydra" / "config.yaml").read_text() == first_config
    assert len(list((run_dir / ".hydra").glob("resumed_*"))) == 1
    assert (run_dir / "checkpoints" / "epoch_00004").is_dir()
    if window == SLIDING:  # the resumed epochs slid on from where the window was, as the straight run's did
        starts = client.get_metric_history(run.info.run_id, "rollout/sde_window_start")
        assert [m.value for m in sorted(starts, key=lambda m: m.step)] == [0, 1, 2, 0, 1]


def test_resume_of_a_directory_without_checkpoints_fails_before_building(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    result = pcpo_train(tmp_path / "mlflow.db", f"resume={tmp_path}", returncode=2)
    assert f"resume={str(tmp_path)!r}" in result.stderr and "no complete checkpoint" in result.stderr


def test_missing_weights_stop_the_cli_with_the_fix_not_a_traceback(tmp_path: Path) -> None:
    result = pcpo_train(tmp_path / "mlflow.db", "model=sd15", f"model.pretrained={tmp_path / 'no_sd15'}",
                        f"hydra.run.dir={tmp_path / 'run'}", returncode=1)
    assert f"pcpo-train: Cannot load model '{tmp_path / 'no_sd15'}'" in result.stderr
    assert "model.pretrained=<local path> (a pipeline folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was logged for a run that never started


def test_flux_without_weights_or_hub_stops_at_once_with_the_fix(tmp_path: Path) -> None:
    """The issue's command, on a machine whose hub endpoint refuses connections and whose cache is empty."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    offline = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "hub"),
               "HTTPS_PROXY": "", "HTTP_PROXY": "", "https_proxy": "", "http_proxy": "", "ALL_PROXY": ""}
    result = pcpo_train(tmp_path / "mlflow.db", "algorithm=pcpo", "model=flux", f"hydra.run.dir={tmp_path / 'run'}",
                        returncode=1, env=offline)
    assert "pcpo-train: Cannot load model 'black-forest-labs/FLUX.1-dev'" in result.stderr
    assert f"the hub at 127.0.0.1:{port} is unreachable" in result.stderr
    assert "model.pretrained=<local path>" in result.stderr and "Traceback" not in result.stderr
    assert "Retrying" not in result.stderr + result.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_failed_rewards_are_left_out_and_counted_without_stopping_training(compose_cfg, tmp_path: Path) -> None:
    """A reward that returns NaN / inf for some samples: zero advantage for them, a count, finite weights."""
    import torch

    from pcpo_hydra.build import build_trainer
    from pcpo_hydra.config import validate

    trainer = build_trainer(validate(compose_cfg(*TINY)), tmp_path, track=False)
    real = trainer.parts.reward

    class FailsTwice:
        name = "fails_twice"

        def score_parts(self, images, prompts):
            rewards, parts = real.score_parts(images, prompts)
            rewards[1], rewards[5] = float("nan"), float("inf")
            return rewards, parts

    trainer.parts.reward = FailsTwice()
    before = [p.detach().clone() for p in trainer.parts.model.trainable_parameters()]
    traj, rewards, train_stats = trainer.run_epoch(1)
    metrics = trainer.epoch_metrics(traj, rewards, train_stats)
    assert metrics["rollout/reward_nonfinite"] == 2
    assert traj.advantages[1] == 0 and traj.advantages[5] == 0
    assert math.isfinite(metrics["rollout/reward_mean"]) and math.isfinite(metrics["train/loss"])
    after = list(trainer.parts.model.trainable_parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the finite samples still trained


def metric_steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.parametrize("algorithm", ["grpo", "pcpo"])
@pytest.mark.parametrize("model,sampler", [("tiny_sd3", "flowgrpo_sde"), ("tiny_flux", "dancegrpo_sde")])
def test_flow_models_train_an_epoch_under_each_algorithm(tmp_path: Path, model: str, sampler: str, algorithm: str) -> None:
    store, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    pcpo_train(store, f"model={model}", f"algorithm={algorithm}", f"hydra.run.dir={run_dir}",
               f"text_cache_dir={tmp_path / 'cache'}")
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    assert run.info.status == "FINISHED"
    metrics, tags = run.data.metrics, run.data.tags
    for key in EPOCH_METRICS | {"text_cache/hits", "text_cache/misses"}:
        assert math.isfinite(metrics[key]), key
    assert tags["model"] == model and tags["sampler"] == sampler and tags["algorithm"] == algorithm
    assert metrics["rollout/reward_min"] <= metrics["rollout/reward_mean"] <= metrics["rollout/reward_max"] < 0
    assert metrics["rollout/reward_std"] > 0 and metrics["train/grad_norm"] > 0
    assert 1 <= metrics["text_cache/misses"] <= 3 and metrics["text_cache/hits"] == 0  # <= 2 prompts (+ "")
    assert "weights/diffusion_pytorch_model.safetensors" in artifact_paths(client, run.info.run_id)


def test_text_cache_hits_from_the_second_epoch_and_kl_grows_from_zero(tmp_path: Path) -> None:
    """One prompt, so every epoch draws it; one optimizer step per epoch, so epoch 1 is on the reference."""
    common = ["model=tiny_sd3", "epochs=2", "prompts=list", "prompts.name=one", "prompts.prompts=[a red cube]",
              "algorithm.kl_beta=0.04", "train.num_updates=1", f"text_cache_dir={tmp_path / 'cache'}"]
    pcpo_train(tmp_path / "first.db", *common, f"hydra.run.dir={tmp_path / 'first'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'first.db'}")
    _, run = only_run(client)
    assert metric_steps(client, run.info.run_id, "text_cache/misses") == {1: 2.0, 2: 0.0}  # the prompt and ""
    assert metric_steps(client, run.info.run_id, "text_cache/hits") == {1: 0.0, 2: 1.0}
    kl = metric_steps(client, run.info.run_id, "train/kl_loss")
    assert kl[1] == 0.0 and kl[2] > 0.0
    loss, policy = (metric_steps(client, run.info.run_id, f"train/{k}") for k in ("loss", "policy_loss"))
    assert loss[2] == pytest.approx(policy[2] + 0.04 * kl[2], rel=1e-5)

    # A second run with the encoders offloaded finds every embedding on disk: no encoder call at all.
    pcpo_train(tmp_path / "second.db", *common, "model.offload_text_encoders=true", f"hydra.run.dir={tmp_path / 'second'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'second.db'}")
    _, run = only_run(client)
    assert metric_steps(client, run.info.run_id, "text_cache/misses") == {1: 0.0, 2: 0.0}
    # epoch 1: "" and the prompt up front, then the prompt for the rollout and "" for guidance.
    assert metric_steps(client, run.info.run_id, "text_cache/hits") == {1: 4.0, 2: 1.0}
