"""Collate multi-crop samples into one batch with iBOT block masks.

Follows ``dinov2/data/collate.py`` (``collate_data_and_cast``) without the dtype cast (the engine casts).

Shapes: B samples per rank, n local crops, G / l global / local crop size, N = patch tokens of a
global crop, M = masked tokens in the batch.

Determinism: all draws (mask ratios, mask rectangles, shuffle) come from one numpy Generator derived
from ``generator`` (see :func:`dvtrain.data.masking.numpy_rng_from_torch`); with ``generator=None``
it is seeded from torch's global RNG, which PyTorch seeds per DataLoader worker.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from dvtrain.data.masking import MaskingGenerator, numpy_rng_from_torch

__all__ = ["collate_multicrop"]


def collate_multicrop(
    samples: Sequence[dict[str, Any]],
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    generator: torch.Generator | np.random.Generator | None = None,
) -> dict[str, Any]:
    """Stack crops and draw iBOT masks for the global crops.

    ``int(2B * mask_probability)`` global images are masked; image i of them masks
    ``int(N * u)`` patches with u ~ U(r_i, r_{i+1}), r = linspace(min, max, n_masked + 1)
    (stratified ratios); the other images are unmasked; the order is then shuffled.

    Args:
        samples: B dicts from :class:`dvtrain.data.augment.MultiCropAugmentation`:
            ``global_crops`` (2 float tensors [3, G, G]), ``local_crops`` (n float tensors [3, l, l]),
            optional ``label`` (int).
        mask_ratio_min_max: (min, max) masked fraction of the N patch tokens.
        mask_probability: fraction of the 2B global images that are masked.
        n_tokens: N, patch tokens per global crop; ``None`` -> from ``mask_generator``.
        mask_generator: block mask generator on the global crop's patch grid; ``None`` -> a default
            :class:`MaskingGenerator` on the square grid of ``n_tokens``.
        generator: torch or numpy Generator for the draws; ``None`` -> torch's global RNG.

    Returns:
        dict with
        ``collated_global_crops`` [2B, 3, G, G] (crop 0 of every sample, then crop 1),
        ``collated_local_crops`` [nB, 3, l, l] (local crop j of every sample, j = 0..n-1; shape
        [0] when n = 0),
        ``collated_masks`` [2B, N] bool,
        ``mask_indices_list`` [M] int64 indices into the flattened [2B * N] masks,
        ``masks_weight`` [M] float32, 1 / (masked tokens of the token's image),
        ``n_masked_patches`` [1] int64 (= M),
        ``upperbound`` int, sum over masked images of int(N * r_{i+1}) (>= M; a static buffer size),
        ``labels`` [B] int64 when every sample has ``label``.

    Raises:
        ValueError: empty batch, inconsistent crop counts, bad ratios/probability, or neither
            ``n_tokens`` nor ``mask_generator`` given, or the two disagree.
    """
    if len(samples) == 0:
        raise ValueError("collate_multicrop got an empty list of samples")
    lo, hi = (float(v) for v in mask_ratio_min_max)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if mask_generator is None:
        if n_tokens is None:
            raise ValueError("collate_multicrop needs n_tokens or mask_generator (the global crop's patch grid)")
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"n_tokens={n_tokens} is not a square grid; pass a MaskingGenerator for (h, w)")
        mask_generator = MaskingGenerator((side, side))
    if n_tokens is None:
        n_tokens = mask_generator.num_patches
    if n_tokens != mask_generator.num_patches:
        raise ValueError(
            f"n_tokens={n_tokens} disagrees with the mask generator grid {mask_generator.get_shape()}"
        )

    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    for k, s in enumerate(samples):
        if len(s["global_crops"]) != n_global or len(s["local_crops"]) != n_local:
            raise ValueError(
                f"sample {k} has {len(s['global_crops'])} global / {len(s['local_crops'])} local crops, "
                f"sample 0 has {n_global} / {n_local}; all samples need the same crop counts"
            )
    collated_global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    if n_local > 0:
        collated_local_crops = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
    else:
        collated_local_crops = torch.empty(0)

    rng = numpy_rng_from_torch(generator)
    num_images = collated_global_crops.shape[0]
    n_masked_images = int(num_images * mask_probability)
    # float32 linspace as the reference (torch.linspace), so upperbound matches it bit for bit.
    ratios = torch.linspace(lo, hi, n_masked_images + 1).tolist()
    upperbound = 0
    masks: list[np.ndarray] = []
    for i in range(n_masked_images):
        ratio = rng.uniform(ratios[i], ratios[i + 1])
        masks.append(mask_generator(int(n_tokens * ratio), rng=rng))
        upperbound += int(n_tokens * ratios[i + 1])
    for _ in range(n_masked_images, num_images):
        masks.append(mask_generator(0))
    order = rng.permutation(num_images)
    collated_masks = torch.from_numpy(np.stack([masks[j] for j in order]).reshape(num_images, -1))

    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_image_weight = 1.0 / collated_masks.sum(-1).clamp(min=1).to(torch.float32)
    masks_weight = per_image_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    out: dict[str, Any] = {
        "collated_global_crops": collated_global_crops,
        "collated_local_crops": collated_local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), mask_indices_list.shape[0], dtype=torch.long),
        "upperbound": upperbound,
    }
    if all("label" in s for s in samples):
        out["labels"] = torch.as_tensor([int(s["label"]) for s in samples], dtype=torch.long)
    return out
