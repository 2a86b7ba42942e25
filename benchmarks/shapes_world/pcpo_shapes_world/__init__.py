"""A small text-to-image world with meaning: one coloured shape per image, and its caption.

A plugin of pcpo-hydra, built only from what any outside package has: components whose
`_target_`s point here, their schemas registered in `schemas` (found by the registry by walking
the target's packages), and a `conf/` that Hydra finds through the search-path plugin in
`hydra_plugins/pcpo_shapes_world`. Installed (`pip install ./benchmarks/shapes_world`), it adds
`model=world_sd | world_sd3`, `prompts=world`, `reward=world_*` and `recipe/world_cpu`.

    grammar   the vocabulary and the caption grammar ("a large red circle on the left"), the prompt source
    scenes    scenes drawn from a seed: a caption's attributes plus jitter of position, area and colour
    render    shapes as point tests; scenes -> images [B, 3, H, W] in [0, 1]
    rewards   the caption agreements (colour, position, size, shape) that `reward=world_all` averages
    models    the tiny SD and SD3 classes sized for the world; pretrain: their pretraining
    schemas   the torch-free checks of the reward and prompt nodes

This file imports only pcpo_hydra's light package root, so loading the package (as Hydra does to
read `conf/`) never pulls in torch; that root must come before the modules here import diffusers,
since it lets PyPI's torchvision import beside a CPU torch (pcpo_hydra.torchvision_compat).
"""

import pcpo_hydra  # noqa: F401
