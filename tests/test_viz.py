"""Visualisation: PCA algebra, foreground threshold semantics, explicit attention, figure layout."""

from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch
from PIL import Image
from typer.testing import CliRunner

from dvtrain.models.vit import build_backbone
from dvtrain.viz import (
    attention_figure,
    attention_maps,
    last_block_attention,
    pca,
    pca_figure,
    pca_maps,
    prepare_image,
    viz_app,
)

SAMPLES = Path(sklearn.__file__).parent / "datasets" / "images"


def _tiny(registers=0):
    torch.manual_seed(0)
    return build_backbone("vit_tiny", img_size=56, patch_size=14, depth=2, num_register_tokens=registers).eval()


def test_pca_components_orthonormal_and_match_sklearn():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g) @ torch.randn(10, 10, generator=g)
    comps, mean = pca(x, 3)
    torch.testing.assert_close(comps @ comps.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, x.double().mean(0))
    ref = PCA(3).fit(x.numpy().astype(np.float64))
    dots = np.abs(np.sum(comps.numpy() * ref.components_, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-8)  # same directions up to sign
    var = ((x.double() - mean) @ comps.T).var(0)
    assert var[0] >= var[1] >= var[2]


def _two_region_features(h, w, D, fg_rows, fg_cols, gen, scale=1.0):
    base = torch.randn(D, generator=gen)
    obj = torch.randn(D, generator=gen) * 3
    feats = base + 0.1 * torch.randn(h, w, D, generator=gen)
    fg = torch.zeros(h, w, dtype=torch.bool)
    fg[fg_rows, fg_cols] = True
    feats[fg] += obj + 0.5 * torch.randn(int(fg.sum()), D, generator=gen)  # varied foreground
    return scale * feats.reshape(h * w, D), fg


def test_foreground_threshold_semantics_and_orientation():
    g = torch.Generator().manual_seed(1)
    feats, fg_true = _two_region_features(8, 10, 16, slice(2, 6), slice(3, 8), g)
    for sign in (1.0, -1.0):  # the sign of the input must not flip foreground/background
        maps = pca_maps([sign * feats], [(8, 10)], threshold=0.0)
        np.testing.assert_array_equal(maps.foreground[0], fg_true.numpy())
        rgb, fgm = maps.rgb[0], maps.foreground[0]
        assert rgb.shape == (8, 10, 3)
        assert np.all(rgb[~fgm] == 0.0)  # background is black
        np.testing.assert_allclose(rgb[fgm].min(0), 0.0, atol=1e-12)  # each channel spans [0, 1] on fg
        np.testing.assert_allclose(rgb[fgm].max(0), 1.0, atol=1e-12)
        assert maps.first[0][~fgm].mean() < 0 < maps.first[0][fgm].mean()
        torch.testing.assert_close(maps.components @ maps.components.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # the mask is exactly "standardised first component > threshold"; higher thresholds give subsets
    first = maps.first[0]
    assert abs(first.std(ddof=1) - 1.0) < 1e-9
    prev = None
    for t in (-0.5, 0.0, 0.8, 1.2):
        m = pca_maps([feats], [(8, 10)], threshold=t)
        np.testing.assert_array_equal(m.foreground[0], m.first[0] > t)
        if prev is not None:
            assert np.all(m.foreground[0] <= prev)
        prev = m.foreground[0]
    # no threshold: every patch coloured, the second PCA spans all patches
    full = pca_maps([feats], [(8, 10)], threshold=None)
    assert full.foreground[0].all()
    with pytest.raises(ValueError, match="foreground threshold"):
        pca_maps([feats], [(8, 10)], threshold=100.0)
    with pytest.raises(ValueError, match="does not fit"):
        pca_maps([feats], [(8, 9)])


def test_pca_is_joint_over_images():
    g = torch.Generator().manual_seed(2)
    a, fa = _two_region_features(6, 6, 12, slice(1, 4), slice(1, 4), g)
    b = a[torch.randperm(36, generator=g)]  # the same patches in another order
    maps = pca_maps([a, b], [(6, 6), (6, 6)])
    # a patch gets the same colour wherever it sits: colours are from one PCA over both images
    np.testing.assert_allclose(np.sort(maps.rgb[0].reshape(-1, 3), axis=0), np.sort(maps.rgb[1].reshape(-1, 3), axis=0))
    np.testing.assert_array_equal(maps.foreground[0], fa.numpy())


def test_explicit_attention_equals_the_block():
    model = _tiny(registers=2)
    x = torch.randn(2, 3, 42, 70)
    captured = {}
    blk = model.blocks[-1]
    hooks = [
        blk.attn.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o)),
        blk.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__("in", o)),
    ]
    attn = last_block_attention(model, x)
    for h in hooks:
        h.remove()
    B, H, T, _ = attn.shape
    assert (B, H, T) == (2, 3, 1 + 2 + 15)
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, H, T), rtol=0, atol=1e-6)
    # attn @ v through the output projection reproduces the block's attention output
    v = blk.attn.qkv(captured["in"]).reshape(B, T, 3, H, -1)[:, :, 2].transpose(1, 2)
    out = blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(out, captured["out"], rtol=1e-5, atol=1e-5)
    maps, names = attention_maps(model, x[:1])
    assert names == ["cls", "reg1", "reg2"] and maps.shape == (3, 3, 5)
    torch.testing.assert_close(torch.from_numpy(maps[0]).flatten(), attn[0, :, 0, 3:].mean(0))
    assert np.all(maps.sum(axis=(1, 2)) <= 1 + 1e-6)


def test_figures_on_real_images(tmp_path):
    model = _tiny(registers=2)
    images = [Image.open(SAMPLES / "china.jpg"), Image.open(SAMPLES / "flower.jpg")]
    assert images[0].size == (640, 427)
    # shorter side 112 -> 427 * s = 112, 640 * s = 167.9 -> 12 patches of 14 = 168
    x, resized = prepare_image(images[0], 112, 14)
    assert x.shape == (1, 3, 112, 168) and resized.size == (168, 112)
    fig, maps = pca_figure(model, images, image_size=112)
    assert fig.size == (2 * 168, 2 * 112)
    arr = np.asarray(fig)
    np.testing.assert_array_equal(arr[:112, :168], np.asarray(resized))  # left panel: the input
    right = arr[:112, 168:].astype(int)
    fg_pixels = np.kron(maps.foreground[0], np.ones((14, 14), dtype=bool))  # each patch a 14x14 block
    assert np.all(right[~fg_pixels] == 0) and right[fg_pixels].max() == 255
    assert 0 < maps.foreground[0].mean() < 1
    fig.save(tmp_path / "pca.png")
    att = attention_figure(model, images, image_size=112)
    assert att.size == ((2 + 2) * 168, 2 * 112)
    att.save(tmp_path / "attn.png")


def test_viz_cli(tmp_path):
    model = _tiny()
    torch.save(model.state_dict(), tmp_path / "b.pth")
    runner = CliRunner()
    for cmd in ("pca", "attention"):
        out = tmp_path / f"{cmd}.png"
        res = runner.invoke(viz_app, [cmd, str(SAMPLES / "flower.jpg"), "-c", str(tmp_path / "b.pth"), "-o", str(out), "--image-size", "56"])
        assert res.exit_code == 0, res.output
        # 640x427 -> shorter side 56 (4 patches), longer round(83.9 / 14) = 6 patches
        assert Image.open(out).size == (2 * 84, 56)  # input + PCA map / input + CLS map
    res = runner.invoke(viz_app, ["pca", str(SAMPLES / "flower.jpg"), "-c", str(tmp_path / "b.pth"), "-o", str(tmp_path / "x.jpg")])
    assert res.exit_code == 1 and ".png" in res.output
    res = runner.invoke(viz_app, ["pca", str(tmp_path / "nope.jpg"), "-c", str(tmp_path / "b.pth"), "-o", str(tmp_path / "y.png")])
    assert res.exit_code == 1 and "does not exist" in res.output
