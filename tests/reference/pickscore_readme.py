"""PickScore's scoring code from its README: AutoProcessor + AutoModel, logit_scale.exp() * cosine.

usage: pickscore_readme.py MODEL_DIR PROCESSOR_DIR IMAGES_NPZ PROMPTS_JSON OUT_NPZ

The README scores the images of one prompt; here each image has its own prompt, so the scores are
the diagonal of the same prompt-by-image matrix (before the README's softmax across images).
AutoProcessor gave the PIL image processor when PickScore was published; transformers now picks
torchvision's where it is installed, so the README's result is `backend="pil"`. The default
backend's scores are written too (as torchvision_0, ...), to show what that choice changes.
"""

from __future__ import annotations

import clip_common

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor


def features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; older ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def readme_scores(model, processor, images: list[Image.Image], prompts: list[str]) -> list[float]:
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = features(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = features(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)
    return scores.diagonal().tolist()


def main() -> None:
    model_dir, processor_dir, images_path, prompts_path, out = clip_common.argv(5)
    model = AutoModel.from_pretrained(model_dir).eval()
    processors = {"pil": AutoProcessor.from_pretrained(processor_dir, backend="pil"),
                  "torchvision": AutoProcessor.from_pretrained(processor_dir)}
    for name, processor in processors.items():
        assert processor.image_processor.backend == name, f"{name}: got {processor.image_processor.backend}"
    scores = {name: [] for name in processors}
    for batch, prompts in zip(clip_common.read_images(images_path), clip_common.read_prompts(prompts_path)):
        images = [Image.fromarray(pixels) for pixels in batch]
        for name, processor in processors.items():
            scores[name].append(readme_scores(model, processor, images, prompts))
    default = {f"torchvision_{i}": np.asarray(batch) for i, batch in enumerate(scores["torchvision"])}
    clip_common.write_scores(out, scores["pil"], **default)


if __name__ == "__main__":
    main()
