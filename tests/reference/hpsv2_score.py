"""HPSv2's own scoring (hpsv2.img_score.score) on a tiny random HPS model; run in the hpsv2 reference venv.

Usage: hpsv2_score.py WORKDIR. Reads WORKDIR/images.npz (uint8 HWC arrays, one key per image, in
order) and WORKDIR/prompts.json; writes the checkpoint as HPSv2 releases it (WORKDIR/HPS_tiny.pt,
{"state_dict": ...}), the tokenizer's vocabulary for transformers (vocab.json, merges.txt), the
model config (model_config.json) and WORKDIR/scores.json.

score() hard-codes ViT-H-14 with its laion2B weights (a billion parameters, downloaded); the only
change made to HPSv2's code path is that create_model_and_transforms and get_tokenizer are handed
a tiny model config instead of that name, without base weights. Everything else, the transform, tokenizer, checkpoint loading and
the cosine, is the package's.
"""

import json
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

import torchvision_without_ops  # noqa: F401  (before torchvision is imported)

import numpy as np
import torch
from PIL import Image

TINY = "HPS-tiny"
CONFIG = {  # ViT-H-14's layout (GELU, pre-norm, class-token pooling), small
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def provide_bpe_vocabulary() -> None:
    """hpsv2 1.2.0's wheel lacks open_clip's BPE file; users copy it from open_clip, as done here."""
    hps_open_clip = Path(find_spec("hpsv2").submodule_search_locations[0]) / "src" / "open_clip"
    target = hps_open_clip / "bpe_simple_vocab_16e6.txt.gz"
    if not target.is_file():
        source = Path(find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        shutil.copyfile(source, target)


def main(workdir: Path) -> None:
    provide_bpe_vocabulary()
    from hpsv2 import img_score
    from hpsv2.src.open_clip import factory, tokenizer

    (workdir / "model_configs").mkdir(exist_ok=True)
    (workdir / "model_configs" / f"{TINY}.json").write_text(json.dumps(CONFIG))
    (workdir / "model_config.json").write_text(json.dumps(CONFIG))
    factory.add_model_config(workdir / "model_configs")
    create, get_tokenizer = img_score.create_model_and_transforms, img_score.get_tokenizer
    # No laion2B base weights to start from: the HPS checkpoint, loaded strictly by score(), replaces them all.
    img_score.create_model_and_transforms = lambda name, pretrained, *args, **kwargs: create(TINY, None, *args, **kwargs)
    img_score.get_tokenizer = lambda name: get_tokenizer(TINY)

    torch.manual_seed(0)
    img_score.initialize_model()
    model = img_score.model_dict["model"]
    with torch.no_grad():  # every tensor random, LayerNorms and biases too (a fresh init leaves them 1 and 0)
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    checkpoint = workdir / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)

    bpe = tokenizer._tokenizer
    (workdir / "vocab.json").write_text(json.dumps(bpe.encoder))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")

    images = np.load(workdir / "images.npz")
    prompts = json.loads((workdir / "prompts.json").read_text())
    scores = [float(img_score.score(Image.fromarray(images[key]), prompt, cp=str(checkpoint), hps_version="v2.1")[0])
              for key, prompt in zip(images.files, prompts)]
    (workdir / "scores.json").write_text(json.dumps(scores))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
