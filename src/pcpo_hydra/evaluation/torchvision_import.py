"""Import torchvision, also where its C extension cannot load (a CUDA-built wheel beside CPU torch).

torchmetrics' FID, Inception Score and LPIPS import torch_fidelity and torchvision. PyPI's
torchvision wheel is built against CUDA torch; beside a CPU torch its C extension (the detection ops,
which needs libtorch_cuda) does not load. torchvision tolerates that, except that it still registers
fake kernels for `torchvision::nms` and `qnms` on import, which then fails with "operator
torchvision::nms does not exist". The metrics only use torchvision's pure-Python parts (the AlexNet
module, no detection op), so declaring the two schemas is enough for the import to pass.
"""

from __future__ import annotations

import sys
from types import ModuleType

MISSING_OPERATOR = "operator torchvision::nms does not exist"
# The two ops torchvision registers fake kernels for on import; never called by the metrics.
SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

_library = None  # the torch.library fragment holding the schemas: they live as long as it does


def import_torchvision() -> ModuleType:
    """torchvision, imported as usual, or (only on the missing-operator failure) after declaring its op schemas."""
    global _library
    try:
        import torchvision
    except RuntimeError as error:
        if MISSING_OPERATOR not in str(error):
            raise
        import torch

        # The failed import left half-initialised torchvision modules behind; a retry must start clean.
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in SCHEMAS:
            _library.define(schema)
        import torchvision
    return torchvision
