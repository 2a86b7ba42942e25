"""pcpo-hydra: GRPO and PCPO fine-tuning of text-to-image models, configured by Hydra.

Kept import-light on purpose: `pcpo-train --help` and `--cfg job` must not pull in torch.
"""

from pcpo_hydra import torchvision_compat

torchvision_compat.install()  # before transformers or torchmetrics import torchvision (see the module)

__version__ = "0.1.0"
