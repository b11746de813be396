"""Block-wise (iBOT / BEiT style) patch mask generator.

Follows ``dinov2/data/masking.py`` (``MaskingGenerator``): rectangles of at least ``min_num_patches``
patches with a log-uniform aspect ratio are added until the requested number of patches is masked
(or no rectangle fits after 10 tries).

Randomness: every draw comes from a ``numpy.random.Generator``. When none is passed, one is seeded
from torch's global RNG (:func:`numpy_rng_from_torch`), so a DataLoader worker (which PyTorch seeds
with ``base_seed + worker_id``) produces reproducible masks without touching Python's ``random``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MaskingGenerator", "numpy_rng_from_torch"]


def numpy_rng_from_torch(generator: torch.Generator | np.random.Generator | None = None) -> np.random.Generator:
    """Return a numpy Generator whose seed is drawn from torch (or pass a numpy Generator through).

    Args:
        generator: a ``numpy.random.Generator`` (returned as is), a ``torch.Generator`` (one 62-bit
            seed is drawn from it) or ``None`` (one seed is drawn from torch's global RNG, which a
            DataLoader worker seeds per worker).

    Returns:
        numpy.random.Generator.

    Raises:
        ValueError: ``generator`` is of another type.
    """
    if isinstance(generator, np.random.Generator):
        return generator
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator, a numpy.random.Generator or None, got {type(generator).__name__}"
        )
    seed = int(torch.randint(0, 2**62, (), generator=generator).item())
    return np.random.default_rng(seed)


class MaskingGenerator:
    """Random block masks on a patch grid.

    Follows ``dinov2/data/masking.py``. Deviation: the default cap is ``int(0.5 * h * w)`` patches
    per block-placement round (128 at 224/14, 684 at 518/14, 24 at 112/16); the reference's
    training script computes ``0.5 * img // p * img // p`` which yields 666 at 518/14 and 21 at
    112/16 through operator precedence.

    Args:
        input_size: grid size in patches, ``(h, w)`` or an int for a square grid.
        max_num_patches: most patches a single rectangle may add; ``None`` -> ``int(0.5 * h * w)``.
        min_num_patches: smallest rectangle area in patches (4 in the reference).
        min_aspect: smallest aspect ratio h/w; the largest is ``max_aspect`` or ``1 / min_aspect``.
        max_aspect: largest aspect ratio, ``None`` -> ``1 / min_aspect``.

    Raises:
        ValueError: non-positive grid size, counts or aspect ratios.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: int | float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        height, width = (int(v) for v in input_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"input_size must be positive (h, w) in patches, got {input_size}")
        if min_num_patches <= 0:
            raise ValueError(f"min_num_patches must be > 0, got {min_num_patches}")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect <= 0):
            raise ValueError(f"aspect ratios must be > 0, got min_aspect={min_aspect}, max_aspect={max_aspect}")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.min_num_patches = min_num_patches
        self.max_num_patches = int(0.5 * self.num_patches) if max_num_patches is None else int(max_num_patches)
        if self.max_num_patches <= 0:
            raise ValueError(f"max_num_patches must be > 0, got {max_num_patches}")
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches}], log aspect [{self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}])"
        )

    def get_shape(self) -> tuple[int, int]:
        """Grid shape ``(h, w)`` in patches."""
        return self.height, self.width

    def _add_block(self, mask_HW: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; mask the first one that adds 1..max_mask_patches new patches."""
        for _ in range(10):
            # a + (b - a) * U[0, 1) as Python's random.uniform: also when b < a (target below min area)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            lo, hi = self.log_aspect_ratio
            aspect_ratio = math.exp(lo + (hi - lo) * rng.random())
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask_HW[top : top + h, left : left + w]
                delta = h * w - int(block.sum())
                if 0 < delta <= max_mask_patches:
                    block[...] = True
                    return delta
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
        """Draw one mask.

        Args:
            num_masking_patches: target number of masked patches (reached or undershot, never
                exceeded).
            rng: numpy Generator; ``None`` -> seeded from torch's global RNG.

        Returns:
            np.ndarray of dtype bool, shape ``(h, w)``; True = masked.

        Raises:
            ValueError: negative ``num_masking_patches``.
        """
        if num_masking_patches < 0:
            raise ValueError(f"num_masking_patches must be >= 0, got {num_masking_patches}")
        mask_HW = np.zeros(self.get_shape(), dtype=bool)
        if num_masking_patches == 0:
            return mask_HW
        rng = numpy_rng_from_torch(rng)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._add_block(mask_HW, max_mask_patches, rng)
            if delta == 0:
                break
            mask_count += delta
        return mask_HW
