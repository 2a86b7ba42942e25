"""image-reward 1.5's own ImageReward.score on a tiny random model; run in the imagereward reference venv.

Usage: imagereward_score.py WORKDIR. Reads WORKDIR/images.npz (uint8 HWC arrays, one key per
image, in order) and WORKDIR/prompts.json; writes the checkpoint as ImageReward releases it
(WORKDIR/ImageReward.pt, a plain state dict), WORKDIR/med_config.json, the word-piece vocabulary
(WORKDIR/bert-base-uncased/vocab.txt) and WORKDIR/scores.json.

What differs from `ImageReward.load(path, med_config=...)` followed by `model.score(prompt, image)`,
and why:
- The package's __init__ also imports its ReFL training script (diffusers, accelerate, datasets)
  and OpenAI's `clip` (not on PyPI): the ImageReward module is imported on its own, and load()'s
  four lines (torch.load, ImageReward(...), load_state_dict, eval) are run here.
- ImageReward hard-codes BLIP's ViT-L/16 (24 blocks, 300M parameters); BLIP's create_vit is handed
  the same VisionTransformer class with two 128-wide blocks instead. The MLP's 768 input is
  hard-coded too, so the text encoder keeps BERT's width, with one layer and a small vocabulary.
- BLIP's tokenizer is BertTokenizer.from_pretrained('bert-base-uncased'); with no hub, a local
  folder of that name in the working directory serves it (transformers looks there first).
"""

import json
import os
import sys
import types
from importlib.util import find_spec
from pathlib import Path

import torchvision_without_ops  # noqa: F401  (before torchvision is imported)

import numpy as np
import torch
from PIL import Image

WORDS = ["a", "red", "fox", "&", "blue", "car", "cafe", "terrace", "at", "night", ",", "<", ">", "/", "b", "bold",
         "photo", "of", "cat", "on", "mat", "very", "long", "prompt", "about", "lighthouse", "cliff", "plain", ";"]
# [PAD] 0 as in bert-base-uncased (BLIP pads with it); words, then word pieces of every letter for the rest.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
         *[chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) not in WORDS],
         *[f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]]
MED_CONFIG = {  # BLIP's med_config.json, one layer; BLIP sets encoder_width to the ViT's
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2,
    "encoder_width": 768, "add_cross_attention": True,
}


def import_image_reward_module() -> type:
    """ImageReward.ImageReward.ImageReward, without the package __init__ (see the module docstring)."""
    root = find_spec("ImageReward").submodule_search_locations[0]
    for name, path in (("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    from ImageReward.ImageReward import ImageReward
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    def tiny_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        encoder = VisionTransformer(img_size=image_size, patch_size=16, embed_dim=128, depth=2, num_heads=2,
                                    use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                    drop_path_rate=drop_path_rate)
        return encoder, 128

    blip_pretrain.create_vit = tiny_vit
    return ImageReward


def main(workdir: Path) -> None:
    os.chdir(workdir)  # where BertTokenizer.from_pretrained('bert-base-uncased') finds the vocabulary
    (workdir / "bert-base-uncased").mkdir(exist_ok=True)
    (workdir / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    med_config = workdir / "med_config.json"
    med_config.write_text(json.dumps(MED_CONFIG))
    ImageReward = import_image_reward_module()

    torch.manual_seed(0)
    built = ImageReward(med_config=str(med_config), device="cpu")
    with torch.no_grad():  # every tensor random: the MLP's init (std 1/769, zero biases) would score all alike
        for parameter in built.parameters():
            parameter.copy_(0.3 * torch.randn_like(parameter))
    checkpoint = workdir / "ImageReward.pt"
    torch.save(built.state_dict(), checkpoint)

    # ImageReward.load's body
    state_dict = torch.load(checkpoint, map_location="cpu")
    model = ImageReward(device="cpu", med_config=str(med_config)).to("cpu")
    result = model.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result  # load() ignores both; we must not
    model.eval()

    images = np.load(workdir / "images.npz")
    prompts = json.loads((workdir / "prompts.json").read_text())
    with torch.no_grad():
        scores = [model.score(prompt, Image.fromarray(images[key])) for key, prompt in zip(images.files, prompts)]
    (workdir / "scores.json").write_text(json.dumps(scores))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
