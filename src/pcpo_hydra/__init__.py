"""pcpo-hydra: GRPO and PCPO fine-tuning of text-to-image models, configured by Hydra.

Kept import-light on purpose: `pcpo-train --help` and `--cfg job` must not pull in torch.
"""

__version__ = "0.1.0"
