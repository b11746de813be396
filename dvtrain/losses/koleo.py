"""KoLeo regulariser on the student's CLS tokens (Sablayrolles et al., 2019; DINOv2 section 3).

Follows ``dinov2/loss/koleo_loss.py`` and ``dinov2/train/ssl_meta_arch.py``: applied to the student
backbone CLS tokens (before the head) of each global crop separately, per rank, and summed. The
math (L2 normalisation, nearest neighbour, ``-mean(log(d + eps))`` in fp32) lives in
``dvtrain.kernels.koleo.koleo_loss`` (Triton on CUDA, pure torch otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from dvtrain.kernels.koleo import koleo_loss

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Sum of KoLeo losses over the global crops of a batch.

    Args:
        num_crops: number of global crops stacked in the input (2).
        eps: added to the nearest-neighbour distance inside the log (1e-8).
    """

    def __init__(self, num_crops: int = 2, eps: float = 1e-8) -> None:
        super().__init__()
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.num_crops = num_crops
        self.eps = eps

    def forward(self, cls_tokens_BD: torch.Tensor) -> torch.Tensor:
        """KoLeo of each crop's rows, summed.

        Args:
            cls_tokens_BD: [num_crops * B, D] student CLS tokens, crop-major (crop 0 of every sample,
                then crop 1), any float dtype.

        Returns:
            scalar fp32 loss (unweighted; the caller multiplies by the KoLeo weight).

        Raises:
            ValueError: rows not divisible by ``num_crops``, or B < 2 (no nearest neighbour).
        """
        n = cls_tokens_BD.shape[0]
        if n % self.num_crops != 0:
            raise ValueError(f"{n} CLS tokens cannot be split into {self.num_crops} crops of equal size")
        if n // self.num_crops < 2:
            raise ValueError(
                f"KoLeo needs at least 2 images per crop on each rank, got {n // self.num_crops}; "
                "raise the per-rank batch size or set the KoLeo weight to 0"
            )
        return sum(koleo_loss(chunk, eps=self.eps) for chunk in cls_tokens_BD.chunk(self.num_crops))
