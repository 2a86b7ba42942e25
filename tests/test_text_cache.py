"""Text embeddings cached on disk by model and prompt, and text encoders unloaded behind the cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from pcpo_hydra.models.text_cache import TextEmbeddingCache
from pcpo_hydra.models.tiny import build_tiny_sd

PROMPTS = ["a cat", "a dog", "a cat"]


def count_calls(encoder: nn.Module) -> list[int]:
    """The batch size of every later call of `encoder`, recorded by a forward hook."""
    batches: list[int] = []
    encoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    return batches


@pytest.mark.parametrize("on_disk", [True, False], ids=["disk", "memory"])
def test_cache_returns_what_was_stored_and_counts_distinct_hits_and_misses(tmp_path: Path, on_disk: bool) -> None:
    cache = TextEmbeddingCache(tmp_path if on_disk else None, "model-a")
    embeds = {"prompt_embeds": torch.randn(4, 3), "pooled": torch.randn(2)}
    found, missing = cache.lookup(PROMPTS)
    assert found == {} and missing == ["a cat", "a dog"]
    cache.store("a cat", embeds)
    found, missing = cache.lookup(PROMPTS)
    assert missing == ["a dog"] and set(found) == {"a cat"}
    assert all(torch.equal(found["a cat"][k], v) for k, v in embeds.items())
    assert cache.take_counts() == {"hits": 1.0, "misses": 3.0}
    assert cache.take_counts() == {"hits": 0.0, "misses": 0.0}
    if on_disk:  # a new process (new cache object) sees the same entries; other models do not
        assert set(TextEmbeddingCache(tmp_path, "model-a").lookup(["a cat"])[0]) == {"a cat"}
        assert TextEmbeddingCache(tmp_path, "model-b").lookup(["a cat"])[1] == ["a cat"]
        assert [p.suffix for p in (tmp_path / "model-a").iterdir()] == [".safetensors"]  # no temp file left


def test_fingerprint_follows_the_text_encoder_weights_not_the_build() -> None:
    a, b, other = build_tiny_sd(seed=0), build_tiny_sd(seed=0), build_tiny_sd(seed=1)
    assert a.text_fingerprint() == b.text_fingerprint() != other.text_fingerprint()
    a.to("cpu", torch.bfloat16)  # embeddings computed in another dtype are other embeddings
    assert a.text_fingerprint() != b.text_fingerprint()


def test_encode_through_the_cache_equals_the_encoder_and_skips_it_for_known_prompts(tmp_path: Path) -> None:
    model = build_tiny_sd(seed=0)
    direct = model.encode_prompts(["a cat", "a dog", "a cat"])["prompt_embeds"]
    model.use_text_cache(tmp_path)
    calls = count_calls(model.text_encoder)
    first = model.encode(PROMPTS)["prompt_embeds"]
    second = model.encode(["a dog", "a cat"])["prompt_embeds"]
    assert torch.equal(first, direct) and torch.equal(second, direct[[1, 0]])
    assert calls == [2]  # the two distinct prompts once; the second call is all hits
    assert model.text_cache.take_counts() == {"hits": 2.0, "misses": 2.0}


def test_offloading_embeds_every_prompt_up_front_then_never_calls_the_encoders(tmp_path: Path, caplog) -> None:
    model = build_tiny_sd(seed=0, offload_text_encoders=True)
    model.use_text_cache(tmp_path)
    calls = count_calls(model.text_encoder)
    model.prepare_text(["a cat", "a dog"])
    assert calls == [3]  # "", "a cat", "a dog" in one call
    model.to("cpu")                 # a later placement keeps the encoders offloaded
    model.unconditional()
    model.encode(["a dog", "a cat"])
    assert calls == [3]
    with caplog.at_level(logging.WARNING):
        model.encode(["a bird"])     # not in the prompt set: still encoded, with a warning
    assert calls == [3, 1] and "not in the text cache" in caplog.text


def test_without_offloading_prepare_text_encodes_nothing(tmp_path: Path) -> None:
    model = build_tiny_sd(seed=0)
    model.use_text_cache(tmp_path)
    model.prepare_text(["a cat"])
    assert model.text_cache.take_counts() == {"hits": 0.0, "misses": 0.0}
