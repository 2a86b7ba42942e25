"""Rewards that ask a vision-language model about each image: the VLM, and what such rewards share.

`VLMAnswerer` loads any transformers image-text-to-text chat model whose processor has a chat
template (Qwen2.5-VL by default) through the checked loader and answers one question per image,
greedily, a batch per `generate` call. `VLMReward` is the base of the rewards built on it
(vlm_bertscore, vlm_judge): images reach the VLM as JPEGs if asked (DDPO sent them so), and the
(prompt, answer, score) of every image of the latest call stay in `answers`, which the trainer
logs each epoch so a user sees what the VLM read.
"""

from __future__ import annotations

import io
from abc import abstractmethod
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from pcpo_hydra.images import to_pil
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.weights import WeightsFor, check_source, load_component

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VLM_LAYOUT = "a folder saved with save_pretrained holding the VLM and its processor (with a chat template)"


def concrete_class(auto: Any, pretrained: str, revision: str | None, owner: WeightsFor) -> type[nn.Module]:
    """The model class an Auto class would build for this checkpoint, so `load_component` can check its weights.

    An Auto class is no nn.Module, and transformers fills missing weights at random with a warning;
    loading through the concrete class lets the loader refuse an incomplete checkpoint.
    """
    from transformers import AutoConfig

    config = load_component(AutoConfig, pretrained, "", revision, owner)
    return auto._model_mapping[type(config)]


def jpeg_roundtrip(image: Image.Image, quality: int | None) -> Image.Image:
    """The image as a JPEG of `quality` decodes (None: unchanged), what DDPO's server received."""
    if quality is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


class VLMAnswerer:
    """A chat VLM answering a question about each image, greedily, a batch per `generate` call."""

    def __init__(self, pretrained: str, revision: str | None, max_new_tokens: int, device: str, dtype: str,
                 owner: WeightsFor) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_source(pretrained, revision, owner)
        self.processor = load_component(AutoProcessor, pretrained, "", revision, owner)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        model_class = concrete_class(AutoModelForImageTextToText, pretrained, revision, owner)
        self.model = load_component(model_class, pretrained, "", revision, owner)
        self.model = self.model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        self.max_new_tokens = max_new_tokens

    def chat(self, question: str) -> str:
        """The model's chat text for one image followed by `question`, ready for the answer."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """The answer to questions[k] about images[k] (special tokens and surrounding whitespace removed)."""
        texts = [self.chat(question) for question in questions]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        generated = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        answers = self.processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [answer.strip() for answer in answers]


class VLMReward(BaseReward):
    """Ask the VLM `question(prompt)` about each image and score its answer with `rate`."""

    def __init__(self, pretrained: str, revision: str | None, max_new_tokens: int, jpeg_quality: int | None,
                 batch_size: int, device: str, dtype: str) -> None:
        super().__init__(batch_size)
        owner = WeightsFor(f"reward {self.name!r}", "reward.pretrained", VLM_LAYOUT)
        self.answerer = VLMAnswerer(pretrained, revision, max_new_tokens, device, dtype, owner)
        self.jpeg_quality = jpeg_quality
        self.answers: list[tuple[str, str, float]] = []

    @abstractmethod
    def question(self, prompt: str) -> str:
        """What the VLM is asked about an image generated for `prompt`."""

    @abstractmethod
    def rate(self, prompts: list[str], answers: list[str]) -> Tensor:
        """Rewards [b] for the VLM's answers (NaN where an answer gives none)."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        self.answers = []
        return super().__call__(images, prompts)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pictures = [jpeg_roundtrip(image, self.jpeg_quality) for image in to_pil(images)]
        answers = self.answerer(pictures, [self.question(prompt) for prompt in prompts])
        scores = self.rate(prompts, answers)
        self.answers += zip(prompts, answers, scores.tolist())
        return scores
