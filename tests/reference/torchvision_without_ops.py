"""Import before torchvision in a reference venv: lets PyPI's torchvision load beside CPU torch.

PyPI's torchvision wheel is built for CUDA torch; with the CPU torch 2.13 its C extension (detection
ops such as nms) does not load, which torchvision tolerates, except that torchvision 0.28 then still
registers fake kernels for `torchvision::nms` and `qnms` and fails on import. Declaring the two
schemas (never called: the references only use torchvision.transforms, pure Python on torch) lets
that registration pass.
"""

import torch

_LIBRARY = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: the schemas live as long as it
for _schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
    _LIBRARY.define(_schema)
