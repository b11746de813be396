"""Backbone, heads and checkpoint conversion (see archs.py, vit.py, heads.py, convert.py).

The architecture table (:mod:`dvtrain.models.archs`) imports without torch, so the recipe can
validate against it; the torch modules load on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from dvtrain.models.archs import ARCH_NAMES, ARCH_SPECS, ARCHS

__all__ = ["ARCHS", "ARCH_NAMES", "ARCH_SPECS", "DINOHead", "DinoVisionTransformer", "build_backbone"]

_LAZY = {"DINOHead": "dvtrain.models.heads", "DinoVisionTransformer": "dvtrain.models.vit",
         "build_backbone": "dvtrain.models.vit"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
