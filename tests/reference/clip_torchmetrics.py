"""torchmetrics' clip_score, one (image, prompt) pair at a time, on a local CLIP folder.

usage: clip_torchmetrics.py CLIP_DIR IMAGES_NPZ PROMPTS_JSON OUT_NPZ

torchmetrics takes a callable returning (model, processor) for a model outside its list; it is given
transformers' CLIPModel and a CLIPProcessor holding the PIL image processor, the one torchmetrics ran
when CLIPScore was published (transformers has since made torchvision's its default). Images go in
as uint8 tensors [3, H, W], as torchmetrics' docs show. clip_score averages over its batch before
clipping at 0, so one pair per call gives each pair's own score.
"""

from __future__ import annotations

import clip_common

import torch
from torchmetrics.functional.multimodal import clip_score
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer


class Transformers4CLIPModel(CLIPModel):
    """CLIPModel with transformers 4's get_*_features, which returned the projected embeddings.

    torchmetrics 1.9 normalises what they return; transformers 5 returns a model output holding
    that tensor as pooler_output. Only the return type changes.
    """

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return super().get_text_features(*args, **kwargs).pooler_output


def main() -> None:
    folder, images_path, prompts_path, out = clip_common.argv(4)
    model = Transformers4CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(folder),
                              tokenizer=CLIPTokenizer.from_pretrained(folder))
    scores = []
    for batch, prompts in zip(clip_common.read_images(images_path), clip_common.read_prompts(prompts_path)):
        with torch.no_grad():
            scores.append([clip_score(torch.from_numpy(pixels).permute(2, 0, 1), prompt,
                                      model_name_or_path=lambda: (model, processor)).item()
                           for pixels, prompt in zip(batch, prompts)])
    clip_common.write_scores(out, scores)


if __name__ == "__main__":
    main()
