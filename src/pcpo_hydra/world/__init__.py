"""A small text-to-image world with meaning: one coloured shape per image, and its caption.

    grammar   the vocabulary and the caption grammar ("a large red circle on the left"), the prompt source
    scenes    scenes drawn from a seed: a caption's attributes plus jitter of position, area and colour
    render    shapes as point tests; scenes -> images [B, 3, H, W] in [0, 1]
    models    the tiny SD and SD3 classes sized for the world, and their pretraining

Rewards that read these captions live in `pcpo_hydra.rewards.world`. This file imports nothing,
so loading the package never pulls in torch.
"""
