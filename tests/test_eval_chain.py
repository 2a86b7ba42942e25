"""The research loop through the three commands: pcpo-train (GRPO, PCPO) -> pcpo-sample -> pcpo-eval -> report.

Two 3-epoch runs of the tiny SD evaluate every epoch and keep every checkpoint; each is sampled at the
checkpoint whose held-out reward is nearest one target (one through its MLflow run id), the base model
beside them, and pcpo-eval compares the three folders with randomly initialised metric networks of the
real classes (`metric_weights`), a JPEG reward scored per image, mixed models and a report in MLflow.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from pcpo_hydra.evaluation.matching import eval_history

TRAIN = ["experiment=debug", "epochs=3", "sampler.num_steps=2", "hardware.num_threads=1", "log_images_every=0",
         "eval=holdout", "eval.every=1", "eval.holdout=2", "eval.group_size=2", "checkpoint_every=1",
         "keep_checkpoints=5", "optim.lr=3e-3", "seed=3"]
SAMPLE = ["prompts=list", "max_prompts=3", "seeds=[0,1,2]", "batch_size=5", "hardware.num_threads=1"]


def command(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def jpeg_reward(path: Path) -> float:
    """DDPO's compressibility written out here: minus the kB of the image saved as JPEG at quality 95."""
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
    return -buffer.tell() / 1000


@pytest.mark.integration
def test_two_runs_sampled_at_matched_reward_are_compared_in_a_report(tmp_path: Path, metric_weights) -> None:
    torch_hub, dinov2 = metric_weights
    store = f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {}
    for algorithm in ("grpo", "pcpo"):
        runs[algorithm] = tmp_path / algorithm
        command(tmp_path, "pcpo_hydra.train", f"algorithm={algorithm}", *TRAIN, f"hydra.run.dir={runs[algorithm]}",
                store, f"text_cache_dir={tmp_path / 'cache'}")
    histories = {name: eval_history(run) for name, run in runs.items()}
    assert all(sorted(history) == [0, 1, 2, 3] for history in histories.values())
    target = float(np.mean([histories["grpo"][3], histories["pcpo"][3]]))  # between the two runs' final rewards
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trained = {run.data.tags["run_dir"]: run.info.run_id
               for run in client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])}

    samples = {name: tmp_path / "samples" / name for name in ("base", "grpo", "pcpo")}
    command(tmp_path, "pcpo_hydra.sampling.cli", f"irg.policies={{run:{runs['grpo']}}}", "irg.weights={run:0.0}",
            f"out={samples['base']}", *SAMPLE, store)
    command(tmp_path, "pcpo_hydra.sampling.cli", f"policy=runs:/{trained[str(runs['grpo'])]}", f"match.reward={target}",
            f"out={samples['grpo']}", "log_to_mlflow=true", *SAMPLE, store)
    command(tmp_path, "pcpo_hydra.sampling.cli", f"policy={runs['pcpo']}", f"match.reward={target}",
            f"out={samples['pcpo']}", *SAMPLE, store)
    for name in ("grpo", "pcpo"):  # the checkpoint nearest the target, by hand from the run's own history
        manifest = json.loads((samples[name] / "manifest.json").read_text())
        history = histories[name]  # epoch 0 is the base model; every later epoch has its checkpoint
        nearest = min(history, key=lambda epoch: (abs(history[epoch] - target), epoch))
        assert manifest["matches"]["policy"]["epoch"] == nearest > 0  # (seeded runs: a trained checkpoint)
        assert manifest["weights"]["policy"] == str(runs[name] / "checkpoints" / f"epoch_{nearest:05d}" / "weights")

    out = tmp_path / "report"
    command(tmp_path, "pcpo_hydra.evaluation.cli", f"samples={{base:{samples['base']},grpo:{samples['grpo']},"
            f"pcpo:{samples['pcpo']}}}", f"weights.torch_hub={torch_hub}", f"weights.dinov2={dinov2}",
            "+reward@rewards.jpeg=jpeg_compressibility", f"out={out}", "hardware.num_threads=1", store)

    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 27  # 3 folders x 3 prompts x 3 seeds
    for row in per_image.itertuples():  # the suite's scores are the reward of the PNGs each folder holds
        assert row.jpeg == pytest.approx(jpeg_reward(samples[row.policy] / row.file), abs=2e-3)
    overall = pd.read_csv(out / "overall.csv").set_index("policy")
    assert math.isnan(overall.loc["base", "fid"])  # the reference is not compared with itself
    for name in ("grpo", "pcpo"):
        for metric in ("fid", "fd_dinov2", "inception_score", "lpips_diversity"):
            assert np.isfinite(overall.loc[name, metric]) and overall.loc[name, metric] >= 0, (name, metric)
        assert overall.loc[name, "jpeg_mean"] == pytest.approx(per_image[per_image.policy == name].jpeg.mean())
    per_prompt = pd.read_csv(out / "per_prompt.csv")
    assert len(per_prompt) == 9 and set(per_prompt.columns) >= {"jpeg", "fid", "fd_dinov2", "lpips_diversity"}
    models = pd.read_csv(out / "mixed_models.csv")
    jpeg = models[models.metric == "jpeg"].set_index("policy")
    assert set(jpeg.index) == {"grpo", "pcpo"} and set(jpeg.baseline) == {"base"}
    for name in ("grpo", "pcpo"):  # a balanced design: the fixed effect is the difference of the policies' means
        difference = per_prompt[per_prompt.policy == name].jpeg.mean() - per_prompt[per_prompt.policy == "base"].jpeg.mean()
        assert jpeg.loc[name, "effect"] == pytest.approx(difference, abs=1e-6)
    report = (out / "report.md").read_text()
    for word in ("base", "grpo", "pcpo", "fd_dinov2", "lpips_diversity", "jpeg_mean", "Mixed models", "per_prompt.csv"):
        assert word in report, word
    assert f"epoch {json.loads((samples['pcpo'] / 'manifest.json').read_text())['matches']['policy']['epoch']}" in report

    by_kind = {run.data.tags.get("pcpo.kind"): run for run in client.search_runs(
        [client.get_experiment_by_name("pcpo-hydra").experiment_id])}
    evaluation = by_kind["evaluation"]
    assert evaluation.data.tags["source_run.grpo.policy"] == trained[str(runs["grpo"])]
    assert evaluation.data.tags["source_run.pcpo.policy"] == trained[str(runs["pcpo"])]
    assert evaluation.data.metrics["grpo/jpeg_mean"] == pytest.approx(overall.loc["grpo", "jpeg_mean"])
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")} >= {
        "evaluation/report.md", "evaluation/per_prompt.csv"}
    assert by_kind["samples"].data.tags["source_run.policy"] == trained[str(runs["grpo"])]
