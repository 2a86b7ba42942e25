"""Reward models behind one interface, `rewards.base.BaseReward`: (images, prompts) -> Tensor[B].

Import classes from their submodules (Hydra targets `pcpo_hydra.rewards.jpeg.JpegCompressibility`);
this file imports nothing, so loading the package never pulls in torch or a reward's weights.
"""
