"""The backbone architecture table: width, depth, heads and FFN of every named ViT (no torch import).

The one owner of these numbers: the recipe validates ``model.arch`` and the width/heads rule against
it, :func:`dvtrain.models.vit.build_backbone` builds from it, checkpoint conversion infers head counts
from it.

Reference: ``dinov2/models/vision_transformer.py`` (``vit_small`` ... ``vit_giant2``); ``ffn_layer`` is
the FFN of the released checkpoints. ``vit_tiny`` (192 wide, 3 heads) exists only for CPU tests and
the demo.
"""

from __future__ import annotations

__all__ = ["ARCH_SPECS", "ARCH_NAMES", "ARCHS"]

#: name -> {"embed_dim": channels, "depth": blocks, "num_heads": heads, "ffn_layer": "mlp" | "swiglu"}
ARCH_SPECS: dict[str, dict] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "ffn_layer": "mlp"},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "ffn_layer": "mlp"},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "ffn_layer": "mlp"},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_layer": "mlp"},
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu"},
}
#: Every name a recipe may use (``model.arch``).
ARCH_NAMES: tuple[str, ...] = tuple(ARCH_SPECS)
#: The architectures of released DINOv2 checkpoints.
ARCHS: tuple[str, ...] = ("vit_small", "vit_base", "vit_large", "vit_giant2")
