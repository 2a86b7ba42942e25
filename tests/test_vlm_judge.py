"""reward=vlm_judge: the rating parsed from a tiny Qwen2.5-VL's answers, NaN where there is none, never a crash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pcpo_hydra.config.validation import ConfigError, validate
from pcpo_hydra.rewards.vlm_judge import VLMJudge, parse_rating


@pytest.mark.parametrize(("answer", "rating"), [
    ("7", 7.0), ("Rating: 8/10", 8.0), ("3.5 out of 10", 3.5), (" 10 ", 10.0), ("1", 1.0),
    ("no idea", math.nan), ("", math.nan), ("0", math.nan), ("11", math.nan), ("-2", math.nan),
    ("12, or 5", math.nan),  # the first number counts, and it is off the scale
])
def test_the_rating_is_the_first_number_on_the_scale_else_nan(answer: str, rating: float) -> None:
    parsed = parse_rating(answer, 1, 10)
    assert parsed == rating or (math.isnan(rating) and math.isnan(parsed))


@pytest.fixture(scope="module")
def digit_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL that answers in digits only: a judge that always gives a number."""
    from tiny_vlm import save_tiny_qwen25_vl

    return save_tiny_qwen25_vl(tmp_path_factory.mktemp("digit_vlm"), answer_chars="0123456789")


@pytest.fixture(scope="module")
def letter_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL that never answers with a number."""
    from tiny_vlm import save_tiny_qwen25_vl

    return save_tiny_qwen25_vl(tmp_path_factory.mktemp("letter_vlm"), answer_chars="abcdefghij ")


def images(count: int) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_the_judge_rates_each_image_by_its_answer_to_the_templated_question(digit_vlm: Path) -> None:
    judge = VLMJudge(pretrained=str(digit_vlm), max_new_tokens=1, low=1, high=9, batch_size=3)
    prompts = ["a cat", "a dog", "a red car", "a bike"]
    scores = judge(images(4), prompts)
    answers = [answer for _, answer, _ in judge.answers]
    assert [len(a) for a in answers] == [1, 1, 1, 1] and all(a.isdigit() for a in answers)
    expected = [parse_rating(answer, 1, 9) for answer in answers]
    assert [s if not math.isnan(s) else None for s in scores.tolist()] == \
        [e if not math.isnan(e) else None for e in expected]
    assert judge.question("a cat").startswith('How well does this image match the description "a cat"? Rate it from 1')


def test_answers_without_a_rating_are_nan_and_nothing_fails(letter_vlm: Path) -> None:
    judge = VLMJudge(pretrained=str(letter_vlm), max_new_tokens=4)
    scores = judge(images(3), ["a cat", "a dog", "a car"])
    assert scores.isnan().all() and [len(answer) for _, answer, _ in judge.answers] == [4, 4, 4]


def test_a_scale_that_does_not_run_upwards_is_refused_by_key(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"reward\.low=5: must be below reward\.high=5"):
        validate(compose_cfg("reward=vlm_judge", "reward.low=5", "reward.high=5"))


@pytest.mark.integration
def test_pcpo_train_with_reward_vlm_judge_counts_unrated_images_and_trains_on(digit_vlm: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from test_training import only_run, pcpo_train

    store = tmp_path / "mlflow.db"
    pcpo_train(store, "reward=vlm_judge", f"reward.pretrained={digit_vlm}", "reward.max_new_tokens=1",
               "reward.high=9", "epochs=2", "checkpoint_every=0", f"hydra.run.dir={tmp_path / 'run'}",
               f"text_cache_dir={tmp_path / 'cache'}")
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    assert run.info.status == "FINISHED"
    path = client.download_artifacts(run.info.run_id, "reward_answers/epoch_00002.json", str(tmp_path))
    rows = json.loads(Path(path).read_text())["data"]
    unrated = sum(1 for _, answer, _ in rows if answer == "0")  # 0 is off the 1-9 scale
    assert run.data.metrics["rollout/reward_nonfinite"] == unrated
    rated = [score for _, answer, score in rows if answer != "0"]
    assert rated and run.data.metrics["rollout/reward_mean"] == pytest.approx(sum(rated) / len(rated), rel=1e-5)


@pytest.mark.integration
def test_the_judge_served_by_pcpo_reward_server_rates_as_in_process_nan_included(digit_vlm: Path, tmp_path) -> None:
    from pcpo_hydra.images import from_uint8, to_uint8
    from pcpo_hydra.rewards.remote import RemoteReward
    from test_remote_reward import ServerProcess

    server = ServerProcess(tmp_path, "reward=vlm_judge", f"reward.pretrained={digit_vlm}", "reward.max_new_tokens=1",
                           "reward.high=9")
    batch, prompts = images(6), ["a cat", "a dog", "a bike", "a red car", "a mat", "a cat"]
    try:
        server.start()
        remote = RemoteReward(server.url, batch_size=4)(batch, prompts)
    finally:
        server.stop()
    local = VLMJudge(pretrained=str(digit_vlm), max_new_tokens=1, high=9)(from_uint8(to_uint8(batch)), prompts)
    assert torch.equal(remote.isnan(), local.isnan())
    assert torch.equal(remote[~remote.isnan()], local[~local.isnan()])


def test_offline_without_the_vlm_the_run_stops_in_one_line_naming_it(tmp_path: Path) -> None:
    from test_training import pcpo_train

    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = pcpo_train(tmp_path / "mlflow.db", "reward=vlm_judge", f"hydra.run.dir={tmp_path / 'run'}",
                        returncode=1, env=offline)
    errors = [line for line in result.stderr.splitlines() if line.startswith("pcpo-train:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("pcpo-train: Cannot load reward 'vlm_judge' 'Qwen/Qwen2.5-VL-3B-Instruct'")
    assert "reward.pretrained=<local path>" in errors[0]
