"""Multi-crop augmentation: shapes, op probabilities (via traces), op honesty, determinism.

Reference: dinov2/data/augmentations.py; blur quirk dinov2#411.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dvtrain.data.augment import BLUR_PROBABILITIES, IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
N_DRAWS = 600


def _unnormalise(x):
    return x * STD + MEAN


def _frequencies(aug, image, n=N_DRAWS):
    """Fraction of crops with each op applied, per crop kind (global1, global2, local)."""
    counts = {kind: {} for kind in ("g1", "g2", "local")}
    totals = {"g1": 0, "g2": 0, "local": 0}
    for _ in range(n):
        _, traces = aug.forward_with_trace(image)
        for i, tr in enumerate(traces):
            kind = "g1" if i == 0 else "g2" if i == 1 else "local"
            totals[kind] += 1
            for op, applied in vars(tr).items():
                counts[kind][op] = counts[kind].get(op, 0) + int(applied)
    return {k: {op: c / totals[k] for op, c in v.items()} for k, v in counts.items()}, totals


def _close(freq, p, n):
    """Within 4.5 binomial standard deviations (exact for p in {0, 1})."""
    return abs(freq - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_output_shapes_and_dtypes_for_pil_and_tensor_inputs():
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=32, local_size=16, num_local_crops=3)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    for image in (pil, pil.convert("L"), torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8),
                  torch.randint(0, 256, (1, 40, 52), dtype=torch.uint8)):
        out = aug(image)
        assert set(out) == {"global_crops", "local_crops"}
        assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
        for crop in out["global_crops"]:
            assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
        for crop in out["local_crops"]:
            assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_op_probabilities(mode):
    torch.manual_seed(1234)
    aug = MultiCropAugmentation(global_size=8, local_size=6, num_local_crops=2, blur=mode)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    freq, totals = _frequencies(aug, image)
    p_g1, p_g2, p_local = BLUR_PROBABILITIES[mode]
    assert (p_g1, p_g2, p_local) == ((0.0, 0.9, 0.5) if mode == "reference" else (1.0, 0.1, 0.5))
    for kind, p_blur, p_sol in (("g1", p_g1, 0.0), ("g2", p_g2, 0.2), ("local", p_local, 0.0)):
        n = totals[kind]
        expected = {"flip": 0.5, "color_jitter": 0.8, "grayscale": 0.2, "blur": p_blur, "solarize": p_sol}
        for op, p in expected.items():
            assert _close(freq[kind][op], p, n), (kind, op, freq[kind][op], p)


def test_trace_matches_pixels_solarize_and_identity():
    # White image: crop/flip/blur/grayscale keep 255, jitter keeps it >= 0.6 * 255 (brightness factor
    # in [0.6, 1.4]; contrast, saturation and hue leave a uniform white image as is), so a pixel
    # below 128 means solarize was applied.
    torch.manual_seed(7)
    aug = MultiCropAugmentation(global_size=8, local_size=6, num_local_crops=1)
    white = torch.full((3, 12, 12), 255, dtype=torch.uint8)
    white_normalised = (1.0 - MEAN) / STD
    n_solarized = 0
    for _ in range(200):
        out, traces = aug.forward_with_trace(white)
        crops = out["global_crops"] + out["local_crops"]
        for crop, tr in zip(crops, traces):
            dark = _unnormalise(crop) < 0.5
            assert dark.all() if tr.solarize else not dark.any()
            if not tr.color_jitter and not tr.solarize:
                assert torch.allclose(crop, white_normalised.expand_as(crop), atol=1e-6)
        n_solarized += traces[1].solarize
        assert not traces[0].solarize and not traces[2].solarize
    assert 0 < n_solarized < 200


def test_trace_matches_pixels_grayscale():
    torch.manual_seed(11)
    aug = MultiCropAugmentation(global_size=8, local_size=6, num_local_crops=2)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    seen_gray = seen_colour = 0
    for _ in range(100):
        out, traces = aug.forward_with_trace(image)
        for crop, tr in zip(out["global_crops"] + out["local_crops"], traces):
            rgb = _unnormalise(crop)
            equal = torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)
            if tr.grayscale:  # blur and solarize act per channel, so channels stay equal
                assert equal
                seen_gray += 1
            else:
                seen_colour += not equal
    assert seen_gray > 0 and seen_colour > 0


def test_grayscale_is_bit_exact_with_pil():
    from dvtrain.data.augment import _grayscale_u8

    rgb = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    pil_l = torch.from_numpy(np.array(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L")))
    out = _grayscale_u8(rgb)
    assert out.shape == (3, 17, 23) and out.dtype == torch.uint8
    assert all(torch.equal(out[c], pil_l) for c in range(3))


def test_deterministic_under_torch_seed():
    aug = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=2)
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a = aug(image)
    torch.manual_seed(5)
    b = aug(image)
    c = aug(image)
    for x, y, z in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"],
                       c["global_crops"] + c["local_crops"]):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, z) for x, z in zip(a["global_crops"], c["global_crops"]))


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = [torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=g) for _ in range(4)]
        self.aug = MultiCropAugmentation(global_size=12, local_size=6, num_local_crops=1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.aug(self.images[i])["global_crops"][0]


def test_dataloader_workers_are_reproducible_from_the_loader_generator():
    # PyTorch seeds each worker's torch RNG with base_seed + worker_id, base_seed drawn from `generator`.
    def run(seed):
        loader = torch.utils.data.DataLoader(
            _Images(), batch_size=2, num_workers=1, generator=torch.Generator().manual_seed(seed)
        )
        return torch.cat(list(loader))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="blur"):
        MultiCropAugmentation(32, 16, 2, blur="always")
    with pytest.raises(ValueError, match="crop sizes"):
        MultiCropAugmentation(32, 4, 2)
    with pytest.raises(ValueError, match="num_local_crops"):
        MultiCropAugmentation(32, 16, -1)
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugmentation(32, 16, 2, local_scale=(0.5, 0.1))
    aug = MultiCropAugmentation(32, 16, 0)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match="PIL image"):
        aug(np.zeros((40, 40, 3), dtype=np.uint8))
