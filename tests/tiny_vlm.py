"""A tiny Qwen2.5-VL chat VLM and a tiny BERT encoder built in code: the real transformers classes at toy
sizes, seeded weights.

Saved with save_pretrained, they load back through the generic loaders the VLM rewards use
(AutoProcessor / AutoModelForImageTextToText, AutoTokenizer / AutoModel), so those rewards run end
to end on a CPU, no download. benchmarks/vlm_rewards.py times them.
"""

from __future__ import annotations

from pathlib import Path

import pcpo_hydra  # noqa: F401  first: its torchvision shim, which Qwen's video processor (and loading) needs
import torch
from tokenizers import pre_tokenizers
from transformers import (
    BertConfig, BertModel, BertTokenizer, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
    Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor,
)

# Qwen2.5-VL's special tokens, in Qwen's own order (after the bytes here, not at id 151643)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

PATCH, MERGE, TEMPORAL = 8, 2, 2      # a 32x32 image: 4x4 patches, 2x2 = 4 <|image_pad|> tokens
MIN_PIXELS, MAX_PIXELS = 16 * 16, 64 * 64   # sides rounded to multiples of 16, area clamped to these
TEXT_WIDTH, HEADS = 32, 4             # head_dim 8: mrope_section must sum to head_dim / 2 = 4
INIT_STD = 0.2   # at the default 0.02 the image and question barely move the logits: all answers alike

# Qwen2.5-VL's template (without the default system prompt): images where the user's content puts them
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen's byte-level BPE with the 256 byte symbols and no merges: every string tokenizes, 263 tokens."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIALS)})
    return Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token=IM_END, pad_token=ENDOFTEXT,
        extra_special_tokens=list(SPECIALS[1:]), model_max_length=512,
    )


PRINTABLE = "".join(chr(c) for c in range(ord(" "), ord("~") + 1))


def save_tiny_qwen25_vl(folder: Path, seed: int = 0, answer_chars: str = PRINTABLE) -> Path:
    """Save a seeded random 2+2-layer Qwen2.5-VL (model, processor, greedy generation config) to `folder`.

    The lm_head rows of all but the `answer_chars` (default: the 95 printable ASCII characters) are
    zeroed, so greedy answers run to max_new_tokens in readable text: random weights could emit
    <|im_end|> first, or half a UTF-8 character. Digits alone make a judge that always answers a number.
    """
    tokenizer = tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": PATCH,
            "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL, "window_size": 2 * MERGE * PATCH,
            "fullatt_block_indexes": [1], "out_hidden_size": TEXT_WIDTH, "tokens_per_second": 2,
            "initializer_range": INIT_STD,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": TEXT_WIDTH, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "max_window_layers": 2, "initializer_range": INIT_STD,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "bos_token_id": ids[ENDOFTEXT], "eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT],
        },
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    allowed = [tokenizer.decode([i]) in answer_chars and len(tokenizer.decode([i])) == 1
                 for i in range(len(tokenizer))]
    with torch.no_grad():
        model.lm_head.weight[~torch.tensor(allowed)] = 0.0
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], bos_token_id=ids[ENDOFTEXT],
    )
    model.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, temporal_patch_size=TEMPORAL,
        merge_size=MERGE,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, temporal_patch_size=TEMPORAL,
        merge_size=MERGE,
    )
    Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                        chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


ENCODER_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "image", "contains", "a", "cat", "dog",
                 "riding", "bike", "is", "sitting", "on", "mat", "what", "going", "red", "car"]


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A seeded 3-layer BERT with a word-level vocabulary (ENCODER_WORDS), saved as a checkpoint folder."""
    BertTokenizer(vocab={w: i for i, w in enumerate(ENCODER_WORDS)}, model_max_length=64).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(ENCODER_WORDS), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64)
        BertModel(config).save_pretrained(folder)
    return folder

