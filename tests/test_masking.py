"""Block mask generator: caps, counts, block shape, determinism (dinov2/data/masking.py semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dvtrain.data.masking import MaskingGenerator, numpy_rng_from_torch


@pytest.mark.parametrize(
    ("img", "patch", "cap"),
    [(224, 14, 128), (518, 14, 684), (112, 16, 24)],  # half the patches; reference gets 666 / 21 (precedence)
)
def test_default_cap_is_half_the_patches(img, patch, cap):
    side = img // patch
    gen = MaskingGenerator((side, side))
    assert gen.max_num_patches == cap == int(0.5 * side * side)
    assert gen.get_shape() == (side, side)


def test_aspect_bounds_are_log_symmetric():
    gen = MaskingGenerator(16)
    assert gen.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))


def test_mask_dtype_shape_and_never_exceeds_target():
    gen = MaskingGenerator((16, 12))
    rng = np.random.default_rng(0)
    fills = []
    for target in [0, 1, 4, 10, 25, 50, 96]:
        for _ in range(20):
            mask = gen(target, rng=rng)
            assert mask.dtype == np.bool_ and mask.shape == (16, 12)
            assert mask.sum() <= target
            if target >= 10:
                fills.append(mask.sum() / target)
    # the greedy block filler gets close to the target (measured ~0.99; the reference behaves alike)
    assert np.mean(fills) > 0.95


def test_zero_target_is_empty_and_negative_rejected():
    gen = MaskingGenerator(8)
    assert not gen(0).any()
    with pytest.raises(ValueError, match="num_masking_patches"):
        gen(-1)


def test_single_block_is_a_filled_rectangle_with_bounded_aspect():
    gen = MaskingGenerator(16)
    rng = np.random.default_rng(1)
    shapes = set()
    for _ in range(300):
        mask = np.zeros((16, 16), dtype=bool)
        added = gen._add_block(mask, 40, rng)
        assert added == mask.sum()
        if added == 0:
            continue
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h * w == added <= 40  # one solid rectangle, at most the allowed patches
        # h = round(sqrt(A r)), w = round(sqrt(A / r)), r in [0.3, 3.33], A in [4, 40]: h/w <= ~5
        assert 1 / 6 <= h / w <= 6
        shapes.add((h, w))
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)


def test_default_rng_comes_from_torch_global_rng():
    gen = MaskingGenerator(16)
    torch.manual_seed(3)
    a = gen(60)
    torch.manual_seed(3)
    b = gen(60)
    c = gen(60)
    assert (a == b).all() and not (a == c).all()


def test_numpy_rng_from_torch_types():
    g = torch.Generator().manual_seed(5)
    x = numpy_rng_from_torch(g).random()
    assert x == numpy_rng_from_torch(torch.Generator().manual_seed(5)).random()
    npg = np.random.default_rng(0)
    assert numpy_rng_from_torch(npg) is npg
    with pytest.raises(ValueError, match="generator"):
        numpy_rng_from_torch(42)


def test_invalid_config_rejected():
    with pytest.raises(ValueError, match="input_size"):
        MaskingGenerator((0, 4))
    with pytest.raises(ValueError, match="aspect"):
        MaskingGenerator(4, min_aspect=0.0)
