"""VLM-BERTScore: a vision-language model answers a question about each image, and BERTScore says how
well its answer matches the image's prompt.

DDPO's "LLaVA BERTScore" reward (Black et al., 2023; their LLaVA server): the question "Answer
concisely: what is going on in this image?", the reference "The image contains <prompt>", images sent
as JPEGs of quality 80, and the BERTScore recall of the answer against the reference with
microsoft/deberta-xlarge-mnli at layer 40 (the bert-score package's choice for that encoder), no IDF
weights, no baseline rescaling. The PCPO paper replaces LLaVA with Qwen2.5-VL-3B-Instruct; any chat
VLM whose processor has a chat template loads (`reward.pretrained`). Decoding is greedy.

BERTScore itself is the bert-score package's (its authors' code, what DDPO's server ran):
torchmetrics' BERTScore gives different scores on the same encoder, so it is not used.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from pcpo_hydra.images import to_pil
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.weights import WeightsFor, check_source, load_component

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VLM_LAYOUT = "a folder saved with save_pretrained holding the VLM and its processor (with a chat template)"
ENCODER_LAYOUT = "a folder saved with save_pretrained holding the encoder and its tokenizer"
Score = Literal["precision", "recall", "f1"]


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
    """A chat VLM answering one fixed question about each image, greedily, a batch per `generate` call."""

    def __init__(self, pretrained: str, revision: str | None, question: str, max_new_tokens: int,
                 device: str, dtype: str, owner: WeightsFor) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_source(pretrained, revision, owner)
        self.processor = load_component(AutoProcessor, pretrained, "", revision, owner)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        model_class = concrete_class(AutoModelForImageTextToText, pretrained, revision, owner)
        self.model = load_component(model_class, pretrained, "", revision, owner)
        self.model = self.model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """One answer per image (special tokens and surrounding whitespace removed)."""
        inputs = self.processor(text=[self.prompt] * len(images), images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        generated = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        answers = self.processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [answer.strip() for answer in answers]


class LayerOutput(nn.Module):
    """An encoder whose output is its hidden state after `layer` layers: what BERTScore compares.

    bert-score cuts the encoder's layer list to get this; asking for the hidden states gives the
    same tensor for any architecture, at the cost of running the layers above it.
    """

    def __init__(self, encoder: nn.Module, layer: int) -> None:
        super().__init__()
        self.encoder, self.layer = encoder, layer

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> tuple[Tensor]:
        out = self.encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return (out.hidden_states[self.layer],)


class BertScorer:
    """BERTScore (precision, recall, F1) of candidates against references, as bert-score's BERTScorer computes it.

    The same call bert-score's own scorer makes (bert_cos_score_idf, IDF off: every token weight 1
    but [CLS] and [SEP] at 0), on an encoder loaded through the checked loader.
    """

    def __init__(self, pretrained: str, layer: int, device: str, owner: WeightsFor) -> None:
        from transformers import AutoModel, AutoTokenizer

        check_source(pretrained, None, owner)
        self.tokenizer = load_component(AutoTokenizer, pretrained, "", None, owner)
        encoder = load_component(concrete_class(AutoModel, pretrained, None, owner), pretrained, "", None, owner)
        depth = encoder.config.num_hidden_layers
        if not 0 <= layer <= depth:
            raise ValueError(f"reward.bertscore_layer={layer}: the encoder {pretrained!r} has layers 0..{depth}")
        self.model = LayerOutput(encoder, layer).to(device).eval().requires_grad_(False)
        self.device = device

    def __call__(self, candidates: list[str], references: list[str]) -> dict[str, Tensor]:
        from bert_score.utils import bert_cos_score_idf

        weights: defaultdict[int, float] = defaultdict(lambda: 1.0)
        weights[self.tokenizer.sep_token_id] = 0.0
        weights[self.tokenizer.cls_token_id] = 0.0
        scores = bert_cos_score_idf(self.model, references, candidates, self.tokenizer, weights,
                                    device=self.device, batch_size=len(candidates)).cpu()
        return {"precision": scores[:, 0], "recall": scores[:, 1], "f1": scores[:, 2]}


class VLMBertScore(BaseReward):
    """BERTScore (`score`: recall, precision or f1) of a VLM's answer about each image against its prompt.

    `answers` holds (prompt, answer, score) of every image of the latest call: what the VLM read,
    which the trainer logs each epoch (rewards.base.latest_answers).
    """

    name = "vlm_bertscore"

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen2.5-VL-3B-Instruct",
        revision: str | None = None,
        question: str = "Answer concisely: what is going on in this image?",
        reference: str = "The image contains {prompt}",
        max_new_tokens: int = 32,
        jpeg_quality: int | None = 80,
        bertscore_model: str = "microsoft/deberta-xlarge-mnli",
        bertscore_layer: int = 40,
        score: Score = "recall",
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        super().__init__(batch_size)
        vlm = WeightsFor(f"reward {self.name!r}", "reward.pretrained", VLM_LAYOUT)
        encoder = WeightsFor(f"reward {self.name!r}", "reward.bertscore_model", ENCODER_LAYOUT)
        self.answerer = VLMAnswerer(pretrained, revision, question, max_new_tokens, device, dtype, vlm)
        self.bertscore = BertScorer(bertscore_model, bertscore_layer, device, encoder)
        self.reference, self.jpeg_quality, self.score_name = reference, jpeg_quality, score
        self.answers: list[tuple[str, str, float]] = []

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        self.answers = []
        return super().__call__(images, prompts)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        answers = self.answerer([jpeg_roundtrip(image, self.jpeg_quality) for image in to_pil(images)])
        references = [self.reference.format(prompt=prompt) for prompt in prompts]
        scores = self.bertscore(answers, references)[self.score_name]
        self.answers += zip(prompts, answers, scores.tolist())
        return scores
