"""Pictures of what a backbone learned: PCA of patch features and last-block attention maps.

- `dvtrain viz pca --checkpoint CKPT IMAGE... --out PNG`: the DINOv2 paper figure (Oquab et al.
  2023, Sec. 7.1 / Fig. 1 and 9): a PCA over the patch features of all given images; patches
  whose first component exceeds a threshold are foreground; a second PCA over the foreground
  patches only gives three components shown as RGB (each min-max scaled to [0, 1] over the
  foreground); background is black. Each input image is drawn left of its map.
- `dvtrain viz attention --checkpoint CKPT IMAGE... --out PNG`: the attention of the CLS token and
  of every register token to the patches in the last block (mean over heads), computed
  explicitly from that block's qkv projection (the fused kernels never materialise it).

Sign of the first component: PCA components have no sign. It is oriented so that the mean over
the patches on the image borders is negative, i.e. the border (usually background) falls below
a threshold of 0. The threshold is applied to the first component divided by its standard
deviation over all patches.

Shape legend: B images, T tokens (1 + R + N), N patches (h * w), D width, H heads, M patches of
all images together, K components.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
import typer
from PIL import Image
from torch import Tensor

from dvtrain.data.augment import normalise
from dvtrain.data.images import to_rgb
from dvtrain.errors import run_user_command
from dvtrain.eval.commands import CHECKPOINT_HELP
from dvtrain.eval.features import open_image
from dvtrain.models.vit import DinoVisionTransformer

viz_app = typer.Typer(
    name="viz",
    help="Visualise a backbone: PCA of patch features, last-block attention maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# viridis at 0, .25, .5, .75, 1 (matplotlib's table), linearly interpolated in between
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
) / 255.0


# ----------------------------------------------------------------------------------------------
# images


def prepare_image(image: Image.Image, image_size: int, patch_size: int) -> tuple[Tensor, Image.Image]:
    """Resize so the shorter side is ~`image_size`, both sides multiples of the patch size.

    Args:
        image: any PIL image. image_size: target shorter side, pixels. patch_size: p.

    Returns:
        (x_13HW fp32 ImageNet-normalised [1, 3, H, W], the resized RGB PIL image of size W x H).

    Raises:
        ValueError: image_size < patch_size.
    """
    if image_size < patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch size {patch_size}")
    image = to_rgb(image)
    w, h = image.size
    s = image_size / min(w, h)
    W = max(patch_size, round(w * s / patch_size) * patch_size)
    H = max(patch_size, round(h * s / patch_size) * patch_size)
    image = image.resize((W, H), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return normalise(x)[None], image


# ----------------------------------------------------------------------------------------------
# PCA


def pca(x_MD: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Principal components of the rows of `x_MD` (exact SVD of the centred data, fp64).

    Args:
        x_MD: [M, D] data. k: number of components (<= min(M, D)).

    Returns:
        (components_KD [k, D] orthonormal rows, by decreasing variance; mean_D [D]). The sign of
        each component is fixed so that its largest-magnitude entry is positive.
    """
    x = x_MD.double()
    mean = x.mean(dim=0)
    _, _, Vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = Vh[:k]
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(k), idx])
    return comps * signs[:, None], mean


@dataclass
class PcaMaps:
    """Result of `pca_maps`.

    Attributes:
        rgb: per image [h, w, 3] float in [0, 1] (background 0).
        foreground: per image [h, w] bool.
        first: per image [h, w] first component divided by its std over all patches (oriented).
        components: [3, D] fp64 components of the foreground PCA (orthonormal rows).
    """

    rgb: list[np.ndarray]
    foreground: list[np.ndarray]
    first: list[np.ndarray]
    components: Tensor


def _border_mask(h: int, w: int) -> Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m.flatten()


def pca_maps(patches: Sequence[Tensor], grids: Sequence[tuple[int, int]], threshold: float | None = 0.0) -> PcaMaps:
    """Two-stage PCA of patch features: foreground on the first component, RGB from the second.

    Reference: DINOv2 paper Sec. 7.1 ("we threshold the first component ... then compute a
    second PCA on the remaining patches").

    Args:
        patches: per image [N_i, D] patch features (N_i = h_i * w_i, row-major).
        grids: per image (h_i, w_i).
        threshold: foreground = standardised, border-oriented first component > threshold;
            None = every patch is foreground (a single PCA, no masking).

    Returns:
        PcaMaps.

    Raises:
        ValueError: mismatched grids, fewer than 3 foreground patches, or D < 3.
    """
    if len(patches) != len(grids) or not patches:
        raise ValueError("give one (h, w) grid per patch tensor, at least one image")
    for p, (h, w) in zip(patches, grids):
        if p.shape[0] != h * w:
            raise ValueError(f"patch tensor with {p.shape[0]} rows does not fit a {h}x{w} grid")
    x_MD = torch.cat([p.double() for p in patches])
    if x_MD.shape[1] < 3:
        raise ValueError(f"feature width {x_MD.shape[1]} < 3: no three components to show")
    comps, mean = pca(x_MD, 1)
    first_M = (x_MD - mean) @ comps[0]
    border_M = torch.cat([_border_mask(h, w) for h, w in grids])
    if first_M[border_M].mean() > 0:
        first_M = -first_M
    first_M = first_M / first_M.std().clamp_min(1e-12)
    fg_M = torch.ones_like(first_M, dtype=torch.bool) if threshold is None else first_M > threshold
    if int(fg_M.sum()) < 3:
        raise ValueError(
            f"only {int(fg_M.sum())} patches are above the foreground threshold {threshold}; lower --threshold "
            f"or use --no-threshold"
        )
    comps3, mean3 = pca(x_MD[fg_M], 3)
    proj_M3 = (x_MD - mean3) @ comps3.T
    lo, hi = proj_M3[fg_M].min(dim=0).values, proj_M3[fg_M].max(dim=0).values
    rgb_M3 = ((proj_M3 - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    rgb_M3[~fg_M] = 0.0
    out = PcaMaps([], [], [], comps3)
    start = 0
    for h, w in grids:
        sl = slice(start, start + h * w)
        out.rgb.append(rgb_M3[sl].reshape(h, w, 3).numpy())
        out.foreground.append(fg_M[sl].reshape(h, w).numpy())
        out.first.append(first_M[sl].reshape(h, w).numpy())
        start += h * w
    return out


# ----------------------------------------------------------------------------------------------
# attention


@torch.no_grad()
def last_block_attention(model: DinoVisionTransformer, x_BCHW: Tensor) -> Tensor:
    """Softmax attention weights of the last block, computed from its qkv projection.

    Reference: dinov2/layers/attention.py (`attn = softmax(q * scale @ k^T)`).

    Args:
        model: backbone (its forward runs once; a forward hook captures the last block's qkv).
        x_BCHW: [B, 3, H, W] images.

    Returns:
        attn_BHTT [B, H, T, T] fp32, rows sum to 1; token order [cls, registers, patches].
    """
    blk = model.blocks[-1]
    captured: list[Tensor] = []
    handle = blk.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        model.forward_features(x_BCHW)
    finally:
        handle.remove()
    qkv_BTx = captured[-1].float()
    B, T, _ = qkv_BTx.shape
    H = blk.attn.num_heads
    q_BHTK, k_BHTK, _ = qkv_BTx.reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    scale = q_BHTK.shape[-1] ** -0.5
    return ((q_BHTK * scale) @ k_BHTK.transpose(-2, -1)).softmax(dim=-1)


def attention_maps(model: DinoVisionTransformer, x_13HW: Tensor) -> tuple[np.ndarray, list[str]]:
    """Head-averaged attention of the CLS and register tokens to the patches, per query.

    Args:
        model: backbone. x_13HW: [1, 3, H, W] one image.

    Returns:
        (maps [1 + R, h, w] fp32 attention mass (each map sums to at most 1: the rest goes to
        the cls/register keys), names ["cls", "reg1", ...]).
    """
    R = model.num_register_tokens
    h, w = x_13HW.shape[-2] // model.patch_size, x_13HW.shape[-1] // model.patch_size
    attn_HTT = last_block_attention(model, x_13HW)[0]
    maps = attn_HTT[:, : 1 + R, 1 + R :].mean(dim=0).reshape(1 + R, h, w)
    return maps.numpy(), ["cls"] + [f"reg{i + 1}" for i in range(R)]


# ----------------------------------------------------------------------------------------------
# composition


def colormap(values_hw: np.ndarray) -> np.ndarray:
    """Min-max scale a 2-D map and colour it with viridis; returns uint8 [h, w, 3]."""
    v = values_hw.astype(np.float64)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    pos = v * (len(_VIRIDIS) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(_VIRIDIS) - 2)
    t = (pos - i)[..., None]
    return np.round(255 * ((1 - t) * _VIRIDIS[i] + t * _VIRIDIS[i + 1])).astype(np.uint8)


def _upsample(rgb_hw3: np.ndarray, size_wh: tuple[int, int]) -> Image.Image:
    """Nearest-neighbour upsampling of a patch map to the image size (each patch a p x p block)."""
    arr = rgb_hw3 if rgb_hw3.dtype == np.uint8 else np.round(np.clip(rgb_hw3, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(arr).resize(size_wh, Image.Resampling.NEAREST)


def compose_rows(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Paste panels left to right, rows top to bottom, no margins; black where rows are shorter."""
    widths = [sum(p.width for p in row) for row in rows]
    heights = [max(p.height for p in row) for row in rows]
    canvas = Image.new("RGB", (max(widths), sum(heights)))
    y = 0
    for row, hgt in zip(rows, heights):
        x = 0
        for panel in row:
            canvas.paste(panel.convert("RGB"), (x, y))
            x += panel.width
        y += hgt
    return canvas


@torch.no_grad()
def pca_figure(
    model: DinoVisionTransformer, images: Sequence[Image.Image], image_size: int = 448, threshold: float | None = 0.0
) -> tuple[Image.Image, PcaMaps]:
    """The PCA picture: one row per image, [input | PCA RGB of its patch features].

    Args:
        model: backbone (eval mode is set for the pass and restored).
        images: PIL images. image_size: shorter side in pixels (rounded to the patch size).
        threshold: see `pca_maps`.

    Returns:
        (figure, PcaMaps). Row i is `2 * W_i` wide and `H_i` high.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        prepared = [prepare_image(im, image_size, model.patch_size) for im in images]
        patches, grids = [], []
        for x, _ in prepared:
            patches.append(model.forward_features(x.to(device))["x_norm_patchtokens"][0].float().cpu())
            grids.append((x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size))
    finally:
        model.train(was_training)
    maps = pca_maps(patches, grids, threshold)
    rows = [[im, _upsample(rgb, im.size)] for (_, im), rgb in zip(prepared, maps.rgb)]
    return compose_rows(rows), maps


@torch.no_grad()
def attention_figure(model: DinoVisionTransformer, images: Sequence[Image.Image], image_size: int = 448) -> Image.Image:
    """One row per image: [input | CLS attention | register 1 | ... | register R] (last block).

    Returns:
        The figure; row i is `(2 + R) * W_i` wide and `H_i` high.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        rows = []
        for im in images:
            x, resized = prepare_image(im, image_size, model.patch_size)
            maps, _ = attention_maps(model, x.to(device))
            rows.append([resized] + [_upsample(colormap(m), resized.size) for m in maps])
    finally:
        model.train(was_training)
    return compose_rows(rows)


# ----------------------------------------------------------------------------------------------
# commands


def _load(checkpoint: Path, which: str, device: str | None) -> DinoVisionTransformer:
    from dvtrain.checkpoint.backbone import load_backbone

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_backbone(checkpoint, which=which, device=dev).model


def _save(fig: Image.Image, out: Path) -> None:
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out)
    typer.echo(f"wrote {out} ({fig.width}x{fig.height})")


@viz_app.command("pca")
def pca_command(
    images: List[Path] = typer.Argument(..., help="Input images (JPEG, PNG, ...)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output PNG."),
    which: str = typer.Option("teacher", "--which", help="teacher or student (training checkpoints)."),
    image_size: int = typer.Option(448, "--image-size", help="Shorter image side in pixels (rounded to the patch size)."),
    threshold: float = typer.Option(0.0, "--threshold", help="Foreground: standardised first component above this."),
    no_threshold: bool = typer.Option(False, "--no-threshold", help="No foreground masking (one PCA over all patches)."),
    device: str = typer.Option(None, "--device", help="cpu / cuda; default cuda when available."),
) -> None:
    """PCA of patch features as RGB beside each image (the DINOv2 paper figure).

    Example: dvtrain viz pca -c vits14.pth cat.jpg dog.jpg --out pca.png
    """
    def _run() -> None:
        model = _load(checkpoint, which, device)
        fig, maps = pca_figure(model, [open_image(p) for p in images], image_size, None if no_threshold else threshold)
        fg = [float(m.mean()) for m in maps.foreground]
        _save(fig, out)
        typer.echo("foreground fraction per image: " + ", ".join(f"{f:.2f}" for f in fg))

    run_user_command(_run)


@viz_app.command("attention")
def attention_command(
    images: List[Path] = typer.Argument(..., help="Input images (JPEG, PNG, ...)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output PNG."),
    which: str = typer.Option("teacher", "--which", help="teacher or student (training checkpoints)."),
    image_size: int = typer.Option(448, "--image-size", help="Shorter image side in pixels (rounded to the patch size)."),
    device: str = typer.Option(None, "--device", help="cpu / cuda; default cuda when available."),
) -> None:
    """Last-block attention of the CLS and register tokens (mean over heads) beside each image.

    Example: dvtrain viz attention -c vits14_reg.pth cat.jpg --out attn.png
    """
    def _run() -> None:
        model = _load(checkpoint, which, device)
        _save(attention_figure(model, [open_image(p) for p in images], image_size), out)

    run_user_command(_run)


__all__ = [
    "PcaMaps",
    "attention_figure",
    "attention_maps",
    "colormap",
    "compose_rows",
    "last_block_attention",
    "pca",
    "pca_figure",
    "pca_maps",
    "prepare_image",
    "viz_app",
]
