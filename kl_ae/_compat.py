"""Import-time fixes for the environments kl-ae runs in.

Imported first by ``kl_ae/__init__.py``, so it runs before anything in the package imports
diffusers, lpips, torchmetrics or torchvision.
"""

from __future__ import annotations

import sys

import torch

_TORCHVISION_OPS_LIBRARY = None  # keeps the op-schema Library alive for the whole process


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work when its wheel's C++ ops do not match torch.

    PyPI's torchvision 0.28.0 is a CUDA build; next to a CPU build of torch its ``_meta_registrations``
    fail with ``RuntimeError: operator torchvision::nms does not exist``, which also breaks
    ``import diffusers``, ``import lpips`` and ``import torchmetrics``. Defining the two op schemas
    it registers kernels against lets the import finish; the models and transforms we use
    (vgg16, transforms, make_grid) do not need the compiled ops. A no-op where torchvision imports.
    """
    global _TORCHVISION_OPS_LIBRARY
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS_LIBRARY = lib
    import torchvision  # noqa: F401,F811


ensure_torchvision_importable()
