"""Sampling from trained policies: `pcpo-sample` and Implicit Reward Guidance (`guidance`).

`sampling.config` is torch-free (validation before heavy imports); `guidance` and `cli`'s run import torch.
"""
