"""Let PyPI's torchvision import beside a CPU build of torch.

PyPI's torchvision wheels are built against CUDA torch. Beside a CPU torch (what a CPU-only machine,
and this project's CI, installs) their C extension cannot load, since it links libtorch_cuda.
torchvision means to carry on without it, but then registers Python kernels for its `nms` and `qnms`
operators, whose schemas only the extension declares, and the import fails. transformers, diffusers
and torchmetrics import torchvision whenever it is installed, so that failure would take every model,
reward and metric with it. No maintained package fixes this pairing, hence this module.

`install()` (called by the package's __init__, torch-free) puts a finder first on sys.meta_path that
acts once, when something imports torchvision: it tries to load the extension itself, and only if
that fails declares the two schemas (never called: the pure-Python parts we use do not run them).
Where the extension loads (a matching torch and torchvision, as on a GPU machine) nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_declared: list[Any] = []  # the torch.library.Library holding the schemas lives as long as the process


def _extension_loads(package: Path) -> bool:
    import torch

    for library in package.glob("_C*.so"):
        try:
            torch.ops.load_library(str(library))
            return True
        except OSError:
            return False
    return False


def _declare_missing_ops() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or _declared:
        return
    if _extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    _declared.append(library)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first `import torchvision` it removes itself and readies torch's side."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_missing_ops()
        return None


def install() -> None:
    """Arm the finder (torch-free); a no-op once torchvision is imported or the finder is armed."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
