"""Our CLIPScore, PickScore and aesthetic rewards with torchvision importable or blocked.

usage: clip_ours.py PACKAGE_PARENT MODE SPEC_JSON IMAGES_NPZ PROMPTS_JSON OUT_NPZ

PACKAGE_PARENT holds a copy of the pcpo_hydra package under test. MODE "torchvision" checks that
torchvision imports (transformers then defaults to its torchvision image processors); "blocked"
makes `import torchvision` fail, as on a machine without it. SPEC maps reward name -> constructor
arguments. Writes <reward>_<i> scores per image batch, and `auto_pixels`: what transformers'
AutoImageProcessor of the CLIPScore folder makes of the first batch, to show the mode matters to it.
"""

from __future__ import annotations

import sys

import clip_common

package, mode, spec_path, images_path, prompts_path, out = clip_common.argv(6)
sys.path.insert(0, package)
if mode == "blocked":
    sys.modules["torchvision"] = None  # import raises ImportError; importlib's find_spec reports it absent
else:
    import torchvision  # noqa: F401  (fails loudly if this venv lost it)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

from pcpo_hydra.rewards.aesthetic import AestheticScore  # noqa: E402
from pcpo_hydra.rewards.clip_score import ClipScore  # noqa: E402
from pcpo_hydra.rewards.pickscore import PickScore  # noqa: E402

REWARDS = {"clipscore": ClipScore, "pickscore": PickScore, "aesthetic": AestheticScore}

spec = json.loads(Path(spec_path).read_text())
batches = clip_common.read_images(images_path)
prompt_lists = clip_common.read_prompts(prompts_path)
results = {}
for name, arguments in spec.items():
    reward = REWARDS[name](**arguments)
    for i, (batch, prompts) in enumerate(zip(batches, prompt_lists)):
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        results[f"{name}_{i}"] = reward(images, prompts).numpy()
auto = AutoImageProcessor.from_pretrained(spec["clipscore"]["pretrained"])
results["auto_pixels"] = auto(images=list(batches[0]), return_tensors="pt").pixel_values.numpy()
np.savez(out, **results)
