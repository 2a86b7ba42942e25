"""pcpo-eval and pcpo-sample's new sources fail before any network is built, in one line naming the key.

Sample folders here are written by hand in pcpo-sample's layout (a manifest and PNGs), so no model runs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image


def write_folder(folder: Path, seeds: list[int], prompts: tuple[str, ...] = ("a cat", "a dog")) -> Path:
    folder.mkdir(parents=True)
    entries = []
    for k, prompt in enumerate(prompts):
        for seed in seeds:
            name = f"{k:04d}_seed{seed}.png"
            Image.new("RGB", (32, 32), (40 * k, 10 * seed, 90)).save(folder / name)
            entries.append({"prompt": prompt, "seed": seed, "policy": folder.name, "steps": 2, "guidance": 5.0,
                            "file": name})
    (folder / "manifest.json").write_text(json.dumps({"policy": folder.name, "model": "m", "images": entries}))
    return folder


def run(module: str, cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    return result, time.perf_counter() - started


def one_line(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"{command}: invalid configuration: ")
    return line.removeprefix(f"{command}: invalid configuration: ")


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {"base": write_folder(tmp_path / "base", [0, 1]), "a": write_folder(tmp_path / "a", [0, 1]),
            "other": write_folder(tmp_path / "other", [0, 2])}


def samples(folders: dict[str, Path], *names: str) -> str:
    return "samples={" + ",".join(f"{name}:{folders[name]}" for name in names) + "}"


SAMPLES = "samples={{base:{base},a:{a}}}"  # formatted with the folders


@pytest.mark.parametrize("overrides, message", [
    (["samples={{base:NOWHERE,a:{a}}}"], "samples.base='NOWHERE': no manifest.json there; give a folder pcpo-sample wrote"),
    (["samples={{base:{base},other:{other}}}"], "samples.other: its (prompt, seed) pairs differ from samples.base's; "
                                                "sample every folder with the same prompts, max_prompts and seeds"),
    ([SAMPLES, "reference=nope"], "reference='nope': names no samples; one of base, a"),
    ([SAMPLES, "metrics=[fid,fvd]"], "metrics=['fid', 'fvd']: unknown fvd; any of fid, fd_dinov2, inception_score, "
                                     "lpips_diversity"),
    ([SAMPLES, "batch_size=0"], "batch_size=0: must be a number > 0"),
    ([SAMPLES, "+reward@rewards.aes=aesthetic", "rewards.aes.batch_size=0"], "rewards.aes.batch_size=0: must be"),
    pytest.param([SAMPLES, "+reward@rewards.text=ocr", "rewards.text.tesseract_cmd=/nonexistent/t", "metrics=[]"],
                 "rewards.text (pcpo_hydra.rewards.ocr.OcrReward) needs the executable '/nonexistent/t'",
                 marks=pytest.mark.skipif(importlib.util.find_spec("pytesseract") is None,  # else a second problem
                                          reason="pip install 'pcpo-hydra[ocr]'")),
])
def test_a_bad_pcpo_eval_key_is_one_line_with_exit_2(tmp_path: Path, folders, overrides: list[str], message: str) -> None:
    result, _ = run("pcpo_hydra.evaluation.cli", tmp_path, *(o.format(**folders) for o in overrides),
                    f"out={tmp_path / 'report'}")
    assert one_line(result, "pcpo-eval").startswith(message)
    assert not (tmp_path / "report" / "report.md").exists()


def test_missing_metric_weights_fail_at_once_naming_each_file_and_its_key(tmp_path: Path, folders) -> None:
    """This machine is offline: an empty torch_hub and a missing DINOv2 folder fail before any network is built."""
    (tmp_path / "hub").mkdir()
    result, seconds = run("pcpo_hydra.evaluation.cli", tmp_path, samples(folders, "base", "a"),
                          f"weights.torch_hub={tmp_path / 'hub'}", f"weights.dinov2={tmp_path / 'no_dinov2'}",
                          f"out={tmp_path / 'report'}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "pcpo-eval: invalid configuration (3 problem(s)):"
    problems = "\n".join(lines[1:])
    assert "metrics fid, inception_score: weights-inception-2015-12-05-6726825d.pth is not in" in problems
    assert "set weights.torch_hub=<folder holding checkpoints/weights-inception-2015-12-05-6726825d.pth>" in problems
    assert "metric lpips_diversity: alexnet-owt-7be5be79.pth is not in" in problems
    assert "weights.dinov2=<local path>" in problems
    assert seconds < 30, seconds  # a probe of each download host, then out: never a download's retries


def test_pcpo_sample_from_an_unknown_mlflow_run_is_one_line(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = tmp_path / "m.db"
    args = ["policy=runs:/0123456789abcdef", f"logger.tracking_uri=sqlite:///{store}", f"out={tmp_path / 'out'}"]
    result, _ = run("pcpo_hydra.sampling.cli", tmp_path, *args)
    assert one_line(result, "pcpo-sample") == (f"policy='runs:/0123456789abcdef': there is no MLflow store at {store}; "
                                               "set logger.tracking_uri to the store the run was logged to")
    assert not store.exists()  # looking a run up never creates a store
    MlflowClient(f"sqlite:///{store}").search_experiments()  # an empty store
    result, _ = run("pcpo_hydra.sampling.cli", tmp_path, *args)
    assert one_line(result, "pcpo-sample").startswith("policy='runs:/0123456789abcdef': no such run in the MLflow store")


def test_pcpo_sample_at_a_reward_needs_the_runs_eval_history(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    result, _ = run("pcpo_hydra.sampling.cli", tmp_path, f"policy={run_dir}", "match.reward=0.5",
                    f"out={tmp_path / 'out'}")
    line = one_line(result, "pcpo-sample")
    assert line.startswith(f"policy={str(run_dir)!r}: ") and "eval=holdout" in line


def test_a_bad_key_and_help_import_no_heavy_library(tmp_path: Path, folders) -> None:
    """The config and the folders are checked before torch, pandas, statsmodels or mlflow is imported."""
    code = ("import sys; from pcpo_hydra.evaluation.cli import main\n"
            "sys.argv = ['pcpo-eval', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY:', sorted(m for m in ('torch', 'pandas', 'statsmodels', 'mlflow') if m in sys.modules))\n")
    for args in ([SAMPLES.format(**folders), "batch_size=0", f"out={tmp_path / 'r'}"], ["--help"]):
        result = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.stdout.strip().splitlines()[-1] == "HEAVY: []", result.stdout + result.stderr
