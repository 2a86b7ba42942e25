"""VLM-BERTScore: a VLM answers a question about each image, and BERTScore says how well its answer
matches the image's prompt.

DDPO's "LLaVA BERTScore" reward (Black et al., 2023; their LLaVA server): the question "Answer
concisely: what is going on in this image?", the reference "The image contains <prompt>", images sent
as JPEGs of quality 80, and the BERTScore recall of the answer against the reference with
microsoft/deberta-xlarge-mnli at layer 40 (the bert-score package's choice for that encoder), no IDF
weights, no baseline rescaling. The PCPO paper replaces LLaVA with Qwen2.5-VL-3B-Instruct.

BERTScore itself is the bert-score package's (its authors' code, what DDPO's server ran):
torchmetrics' BERTScore gives different scores on the same encoder, so it is not used.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

from torch import Tensor, nn

from pcpo_hydra.rewards.vlm import VLMReward, concrete_class
from pcpo_hydra.weights import WeightsFor, check_source, load_component

ENCODER_LAYOUT = "a folder saved with save_pretrained holding the encoder and its tokenizer"
Score = Literal["precision", "recall", "f1"]


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


class VLMBertScore(VLMReward):
    """BERTScore (`score`: recall, precision or f1) of a VLM's answer about each image against its prompt."""

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
        super().__init__(pretrained, revision, max_new_tokens, jpeg_quality, batch_size, device, dtype)
        encoder = WeightsFor(f"reward {self.name!r}", "reward.bertscore_model", ENCODER_LAYOUT)
        self.bertscore = BertScorer(bertscore_model, bertscore_layer, device, encoder)
        self.fixed_question, self.reference, self.score_name = question, reference, score

    def question(self, prompt: str) -> str:
        return self.fixed_question

    def rate(self, prompts: list[str], answers: list[str]) -> Tensor:
        references = [self.reference.format(prompt=prompt) for prompt in prompts]
        return self.bertscore(answers, references)[self.score_name]
