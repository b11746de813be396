"""Backbone, heads and checkpoint conversion (see vit.py, heads.py, convert.py)."""

from dvtrain.models.heads import DINOHead
from dvtrain.models.vit import ARCH_SPECS, ARCHS, DinoVisionTransformer, build_backbone

__all__ = ["ARCHS", "ARCH_SPECS", "DINOHead", "DinoVisionTransformer", "build_backbone"]
