"""reward=vlm_bertscore: BERTScore equal to its authors' package and to a hand computation, a tiny Qwen2.5-VL
of the real classes answering through the real loader, and the reward end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pcpo_hydra.rewards.vlm import VLMAnswerer, jpeg_roundtrip
from pcpo_hydra.rewards.vlm_bertscore import BertScorer, VLMBertScore
from pcpo_hydra.weights import ModelLoadError, WeightsFor

CANDIDATES = ["a cat riding a bike", "the dog", "dog dog dog", "a red car on a mat"]
REFERENCES = ["the image contains a cat riding a bike", "the image contains a cat", "a cat",
              "the image contains a red car"]
OWNER = WeightsFor("reward 'vlm_bertscore'", "reward.bertscore_model", "a folder")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_vlm import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_bertscore_equals_the_bert_score_packages_own_scorer(tiny_encoder: Path) -> None:
    from bert_score import BERTScorer

    ours = BertScorer(str(tiny_encoder), 2, "cpu", OWNER)(CANDIDATES, REFERENCES)
    precision, recall, f1 = BERTScorer(model_type=str(tiny_encoder), num_layers=2, use_fast_tokenizer=True).score(
        CANDIDATES, REFERENCES)
    assert torch.allclose(ours["precision"], precision, atol=1e-6)
    assert torch.allclose(ours["recall"], recall, atol=1e-6)
    assert torch.allclose(ours["f1"], f1, atol=1e-6)
    assert len(set(recall.tolist())) == len(CANDIDATES)  # the pairs are told apart


def test_recall_is_the_mean_best_cosine_of_each_reference_word_by_hand(tiny_encoder: Path) -> None:
    """Each reference token (not [CLS]/[SEP]) takes its most similar candidate token ([CLS]/[SEP] included)."""
    from transformers import BertModel, BertTokenizer

    tokenizer, model = BertTokenizer.from_pretrained(tiny_encoder), BertModel.from_pretrained(tiny_encoder)

    def states(text: str) -> torch.Tensor:
        ids = tokenizer(text, return_tensors="pt")
        hidden = model(**ids, output_hidden_states=True).hidden_states[2][0]
        return torch.nn.functional.normalize(hidden, dim=-1)

    candidate, reference = states(CANDIDATES[0]), states(REFERENCES[0])
    best = (reference @ candidate.T).max(1).values[1:-1]  # drop the reference's [CLS] and [SEP]
    expected_recall = best.mean().item()
    best_for_candidate = (candidate @ reference.T).max(1).values[1:-1]
    expected_precision = best_for_candidate.mean().item()
    scores = BertScorer(str(tiny_encoder), 2, "cpu", OWNER)(CANDIDATES[:1], REFERENCES[:1])
    assert scores["recall"].item() == pytest.approx(expected_recall, abs=1e-6)
    assert scores["precision"].item() == pytest.approx(expected_precision, abs=1e-6)
    p, r = expected_precision, expected_recall
    assert scores["f1"].item() == pytest.approx(2 * p * r / (p + r), abs=1e-6)


def test_a_layer_the_encoder_lacks_is_refused_by_key(tiny_encoder: Path) -> None:
    with pytest.raises(ValueError, match=r"reward\.bertscore_layer=4: .* has layers 0\.\.3"):
        BertScorer(str(tiny_encoder), 4, "cpu", OWNER)


def without_a_tensor(folder: Path, into: Path, part: str) -> Path:
    """A copy of a checkpoint folder whose weights lack the first tensor whose name holds `part`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, into)
    weights = load_file(into / "model.safetensors")
    weights.pop(next(k for k in weights if part in k))
    save_file(weights, into / "model.safetensors", metadata={"format": "pt"})
    return into


def test_an_encoder_with_a_missing_tensor_is_refused_naming_the_key(tiny_encoder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"reward\.bertscore_model"):
        BertScorer(str(without_a_tensor(tiny_encoder, tmp_path / "broken", "encoder.layer.1")), 2, "cpu", OWNER)


def test_the_jpeg_roundtrip_is_pils_at_that_quality() -> None:
    from PIL import Image

    image = Image.fromarray((torch.rand(20, 30, 3, generator=torch.Generator().manual_seed(0)) * 255)
                            .to(torch.uint8).numpy())
    assert jpeg_roundtrip(image, None) is image
    low, high = jpeg_roundtrip(image, 10), jpeg_roundtrip(image, 95)
    assert low.size == image.size and low.mode == "RGB"
    error = {q: np.abs(np.asarray(im, np.float32) - np.asarray(image, np.float32)).mean()
             for q, im in ((10, low), (95, high))}
    assert error[10] > error[95] > 0


# ---- the VLM ----------------------------------------------------------------------------------------

VLM_OWNER = WeightsFor("reward 'vlm_bertscore'", "reward.pretrained", "a folder")
QUESTION = "Answer concisely: what is going on in this image?"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_vlm import save_tiny_qwen25_vl

    return save_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny_qwen25_vl"))


def random_images(count: int, side: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(7))


def test_the_vlm_answers_greedily_the_same_alone_or_in_a_left_padded_batch(tiny_vlm: Path) -> None:
    from pcpo_hydra.images import to_pil

    answerer = VLMAnswerer(str(tiny_vlm), None, 8, "cpu", "float32", VLM_OWNER)
    images = to_pil(random_images(2)) + to_pil(random_images(1, side=48))  # a larger one: more image tokens
    questions = [QUESTION, QUESTION, "Hi?"]  # a shorter question: more left padding
    batched = answerer(images, questions)
    assert batched == answerer(images, questions)  # greedy: the same answers every time
    assert batched == [answerer([image], [question])[0] for image, question in zip(images, questions)]
    assert all(answer for answer in batched) and len(set(batched)) > 1  # the answer depends on the image


def test_the_reward_is_the_bertscore_of_the_vlms_answers_about_the_jpeg_images(tiny_vlm, tiny_encoder) -> None:
    from pcpo_hydra.images import to_pil

    reward = VLMBertScore(pretrained=str(tiny_vlm), max_new_tokens=8, bertscore_model=str(tiny_encoder),
                          bertscore_layer=2, batch_size=2)
    images, prompts = random_images(3), ["a cat riding a bike", "a dog", "a red car"]
    scores = reward(images, prompts)
    answers = reward.answerer([jpeg_roundtrip(image, 80) for image in to_pil(images)], [QUESTION] * 3)
    expected = BertScorer(str(tiny_encoder), 2, "cpu", OWNER)(answers, [f"The image contains {p}" for p in prompts])
    assert torch.allclose(scores, expected["recall"], atol=1e-6)
    assert reward.answers == list(zip(prompts, answers, scores.tolist()))  # what it read, for the run's table
    reward.score_name = "f1"
    assert torch.allclose(reward(images, prompts), expected["f1"], atol=1e-6)


def test_a_vlm_with_a_missing_tensor_is_refused_naming_the_key(tiny_vlm: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"reward\.pretrained"):
        VLMAnswerer(str(without_a_tensor(tiny_vlm, tmp_path / "broken", "visual")), None, 8, "cpu", "float32", VLM_OWNER)


@pytest.mark.integration
def test_pcpo_train_with_reward_vlm_bertscore_logs_finite_rewards(tiny_vlm, tiny_encoder, tmp_path) -> None:
    from mlflow import MlflowClient

    from test_training import only_run, pcpo_train

    store = tmp_path / "mlflow.db"
    pcpo_train(store, "reward=vlm_bertscore", f"reward.pretrained={tiny_vlm}", f"reward.bertscore_model={tiny_encoder}",
               "reward.bertscore_layer=2", "reward.max_new_tokens=4", "epochs=2", "checkpoint_every=0",
               f"hydra.run.dir={tmp_path / 'run'}", f"text_cache_dir={tmp_path / 'cache'}")
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    rewards = [m.value for m in client.get_metric_history(run.info.run_id, "rollout/reward_mean")]
    assert len(rewards) == 2 and all(0.0 < r <= 1.0 for r in rewards)  # a BERTScore recall
    assert run.data.metrics["rollout/reward_nonfinite"] == 0 and run.data.tags["reward"] == "vlm_bertscore"
    tables = [entry.path for entry in client.list_artifacts(run.info.run_id, "reward_answers")]
    assert tables == ["reward_answers/epoch_00001.json", "reward_answers/epoch_00002.json"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, tables[-1], str(tmp_path))).read_text())
    assert table["columns"] == ["prompt", "answer", "score"] and len(table["data"]) == 8  # 2 prompts x 4
    assert all(len(answer) == 4 and 0.0 < score <= 1.0 for _, answer, score in table["data"])
    assert sum(score for *_, score in table["data"]) / 8 == pytest.approx(rewards[-1], rel=1e-5)


@pytest.mark.integration
def test_pcpo_train_scores_vlm_bertscore_through_the_reward_server(tiny_vlm, tiny_encoder, tmp_path) -> None:
    """The VLM on its own process (the paper's separate VLM GPU): pcpo-reward-server, then reward=remote."""
    from mlflow import MlflowClient

    from pcpo_hydra.images import from_uint8, to_uint8
    from pcpo_hydra.rewards.remote import RemoteReward
    from test_remote_reward import ServerProcess
    from test_training import only_run, pcpo_train

    reward_keys = [f"reward.pretrained={tiny_vlm}", f"reward.bertscore_model={tiny_encoder}",
                   "reward.bertscore_layer=2", "reward.max_new_tokens=4"]
    server = ServerProcess(tmp_path, "reward=vlm_bertscore", *reward_keys, "server.max_wait_ms=100")
    try:
        server.start()
        batch, prompts = random_images(5), ["a cat", "a dog", "a bike", "a red car", "a mat"]
        remote = RemoteReward(server.url, batch_size=2)(batch, prompts)  # three requests: 2 + 2 + 1
        sent = from_uint8(to_uint8(batch))  # what the wire carries: 8-bit pixels
        local = VLMBertScore(pretrained=str(tiny_vlm), max_new_tokens=4, bertscore_model=str(tiny_encoder),
                             bertscore_layer=2)(sent, prompts)
        assert torch.allclose(remote, local, atol=1e-6)
        store = tmp_path / "mlflow.db"
        pcpo_train(store, "reward=remote", f"reward.url={server.url}", "epochs=1", "checkpoint_every=0",
                   f"hydra.run.dir={tmp_path / 'run'}", f"text_cache_dir={tmp_path / 'cache'}")
    finally:
        server.stop()
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    assert run.info.status == "FINISHED" and run.data.metrics["rollout/reward_nonfinite"] == 0
    assert 0.0 < run.data.metrics["rollout/reward_mean"] <= 1.0
