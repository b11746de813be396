"""collate_multicrop: crop order, stratified masks, weights, indices, determinism (dinov2/data/collate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dvtrain.data.collate import collate_multicrop
from dvtrain.data.masking import MaskingGenerator

B, N_LOCAL, G, L = 4, 3, 8, 6


def _samples(batch=B, n_local=N_LOCAL, labels=True):
    # crop tensors filled with an id: 100 * sample + 10 * kind + crop index (kind 0 global, 1 local)
    out = []
    for s in range(batch):
        d = {
            "global_crops": [torch.full((3, G, G), 100.0 * s + c) for c in range(2)],
            "local_crops": [torch.full((3, L, L), 100.0 * s + 10 + c) for c in range(n_local)],
        }
        if labels:
            d["label"] = 7 + s
        out.append(d)
    return out


def _collate(seed=0, **kw):
    kw.setdefault("mask_generator", MaskingGenerator((16, 16)))
    return collate_multicrop(_samples(), generator=torch.Generator().manual_seed(seed), **kw)


def test_shapes_dtypes_and_crop_order():
    out = _collate()
    g, l = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (2 * B, 3, G, G) and g.dtype == torch.float32
    assert l.shape == (N_LOCAL * B, 3, L, L)
    # crop 0 of every sample, then crop 1
    assert g[:, 0, 0, 0].tolist() == [0, 100, 200, 300, 1, 101, 201, 301]
    assert l[:, 0, 0, 0].tolist() == [10, 110, 210, 310, 11, 111, 211, 311, 12, 112, 212, 312]
    assert out["collated_masks"].shape == (2 * B, 256) and out["collated_masks"].dtype == torch.bool
    assert out["labels"].tolist() == [7, 8, 9, 10] and out["labels"].dtype == torch.long


def test_stratified_masks_weights_and_indices():
    for seed in range(5):
        out = _collate(seed)
        masks = out["collated_masks"]
        counts = masks.sum(1)
        masked = counts[counts > 0]
        # int(2B * 0.5) = 4 masked images, the rest unmasked
        assert len(masked) == 4
        # ratios stratified over linspace(0.1, 0.5, 5): the k-th smallest count <= int(256 * r_{k+1})
        bounds = [int(256 * r) for r in torch.linspace(0.1, 0.5, 5).tolist()[1:]]
        assert bounds == [51, 76, 102, 128]
        assert all(c <= b for c, b in zip(sorted(masked.tolist()), bounds))
        assert out["upperbound"] == 51 + 76 + 102 + 128
        # the generator fills blocks close to each target: smallest >= int(256 * 0.1) - slack
        assert min(masked.tolist()) >= 20
        idx = out["mask_indices_list"]
        assert torch.equal(idx, masks.flatten().nonzero().flatten()) and idx.dtype == torch.long
        assert out["n_masked_patches"].tolist() == [len(idx)] and len(idx) <= out["upperbound"]
        w = out["masks_weight"]
        assert w.dtype == torch.float32 and w.shape == idx.shape
        image_of_token = idx // 256
        assert torch.allclose(w, 1.0 / counts[image_of_token].float())
        # each masked image's weights sum to 1
        per_image = torch.zeros(2 * B).index_add_(0, image_of_token, w)
        assert torch.allclose(per_image, (counts > 0).float())


def test_masked_images_are_shuffled():
    positions = {tuple((_collate(seed)["collated_masks"].sum(1) > 0).tolist()) for seed in range(12)}
    assert len(positions) > 3  # not always the first int(2B * 0.5) images


def test_deterministic_given_generator():
    a, b, c = _collate(3), _collate(3), _collate(4)
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert not torch.equal(a["collated_masks"], c["collated_masks"])
    gen = MaskingGenerator((16, 16))
    x = collate_multicrop(_samples(), mask_generator=gen, generator=np.random.default_rng(9))
    y = collate_multicrop(_samples(), mask_generator=gen, generator=np.random.default_rng(9))
    assert torch.equal(x["collated_masks"], y["collated_masks"])
    torch.manual_seed(1)
    x = collate_multicrop(_samples(), mask_generator=gen)
    torch.manual_seed(1)
    y = collate_multicrop(_samples(), mask_generator=gen)
    assert torch.equal(x["collated_masks"], y["collated_masks"])


def test_mask_probability_zero_and_one():
    out = _collate(mask_probability=0.0)
    assert not out["collated_masks"].any() and out["mask_indices_list"].numel() == 0
    assert out["masks_weight"].numel() == 0 and out["upperbound"] == 0
    out = _collate(mask_probability=1.0)
    assert (out["collated_masks"].sum(1) > 0).all()


def test_n_tokens_only_builds_square_generator_and_no_labels():
    out = collate_multicrop(_samples(labels=False), n_tokens=16, generator=torch.Generator().manual_seed(0))
    assert out["collated_masks"].shape == (2 * B, 16) and "labels" not in out


def test_errors():
    gen = MaskingGenerator((16, 16))
    with pytest.raises(ValueError, match="empty"):
        collate_multicrop([], mask_generator=gen)
    with pytest.raises(ValueError, match="n_tokens or mask_generator"):
        collate_multicrop(_samples())
    with pytest.raises(ValueError, match="disagrees"):
        collate_multicrop(_samples(), n_tokens=100, mask_generator=gen)
    with pytest.raises(ValueError, match="square"):
        collate_multicrop(_samples(), n_tokens=12)
    bad = _samples()
    bad[2]["local_crops"] = bad[2]["local_crops"][:1]
    with pytest.raises(ValueError, match="sample 2"):
        collate_multicrop(bad, mask_generator=gen)
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        collate_multicrop(_samples(), mask_ratio_min_max=(0.5, 0.1), mask_generator=gen)
