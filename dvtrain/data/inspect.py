"""Look at a converted MDS dataset: counts, label histogram, image sizes, and a PNG contact sheet.

The contact sheet shows random samples (seeded) with their labels and, below them, the multi-crop
views (2 global + n local crops, de-normalised) that training would see for a few of those samples,
produced by ``dvtrain.data.augment.MultiCropAugmentation``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dvtrain.data.images import open_rgb
from dvtrain.data.shards import MANIFEST_NAME, iter_label_names

__all__ = ["contact_sheet", "dataset_stats"]

_CELL = 128  # px, side of one sample tile on the contact sheet
_CAPTION = 14  # px of caption under a tile
_BG = (255, 255, 255)


def _open_local(out: str | os.PathLike):
    from streaming import LocalDataset

    path = Path(out)
    if not (path / "index.json").is_file():
        raise ValueError(f"{path} has no index.json: not a local MDS dataset (inspect reads local "
                         f"directories; download a remote dataset first)")
    return LocalDataset(local=str(path))


def _scan_stats(ds) -> dict[str, Any]:
    """Label histogram and image sizes from the shards (image headers only)."""
    labels: dict[int, int] = {}
    widths, heights = [], []
    for i in range(len(ds)):
        s = ds[i]
        labels[int(s["label"])] = labels.get(int(s["label"]), 0) + 1
        with Image.open(io.BytesIO(s["image"])) as im:
            widths.append(im.size[0])
            heights.append(im.size[1])
    def stats(v: list[int]) -> dict[str, float]:
        a = np.asarray(v, dtype=np.float64)
        return {"min": int(a.min()), "max": int(a.max()), "mean": round(float(a.mean()), 2),
                "median": float(np.median(a))}
    return {"label_counts": {str(k): v for k, v in sorted(labels.items())},
            "width": stats(widths), "height": stats(heights), "label_names": None}


def dataset_stats(out: str | os.PathLike, scan: bool = False) -> dict[str, Any]:
    """Sample count, label histogram and image-size statistics of a local MDS dataset.

    Args:
        out: directory written by ``dvtrain data convert``.
        scan: recompute histogram and sizes from the shards instead of reading ``manifest.json``
            (always done when the manifest is missing).

    Returns:
        dict with ``num_samples``, ``num_shards``, ``label_counts`` {label str: count},
        ``label_names`` (list or None), ``width`` / ``height`` {min, max, mean, median} in pixels,
        ``num_skipped`` (conversion), ``source`` (description or None).

    Raises:
        ValueError: ``out`` is not a local MDS dataset.
    """
    ds = _open_local(out)
    index = json.loads((Path(out) / "index.json").read_text())
    manifest_path = Path(out) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    stats: dict[str, Any] = {"num_samples": len(ds), "num_shards": len(index["shards"])}
    if manifest is None or scan:
        stats.update(_scan_stats(ds))
        if manifest is not None:
            stats["label_names"] = manifest.get("label_names")
    else:
        for k in ("label_counts", "label_names", "width", "height"):
            stats[k] = manifest[k]
    stats["num_skipped"] = manifest["num_skipped"] if manifest else None
    stats["source"] = manifest["source"] if manifest else None
    return stats


def _tile(img: Image.Image, side: int) -> Image.Image:
    """Fit img into a side x side tile (aspect kept, nearest for tiny images so pixels stay visible)."""
    img = img.convert("RGB")
    w, h = img.size
    scale = side / max(w, h)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    tile = Image.new("RGB", (side, side), _BG)
    tile.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
    return tile


def _crop_to_image(crop_CHW) -> Image.Image:
    """Normalised float crop [3, S, S] -> uint8 RGB image (undoing ImageNet normalisation)."""
    from dvtrain.data.augment import denormalise

    return Image.fromarray(denormalise(crop_CHW))


def contact_sheet(
    out: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    num_samples: int = 16,
    num_augmented: int = 4,
    global_size: int = 224,
    local_size: int = 96,
    num_local_crops: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a PNG contact sheet of random samples and of their multi-crop views.

    Layout: rows of up to 8 sample tiles (128 px, caption "label name / key"), then one row per
    augmented sample: the original, 2 global crops, ``num_local_crops`` local crops.

    Args:
        out: local MDS dataset directory.
        png_path: output PNG file.
        num_samples: random samples shown (fewer if the dataset is smaller).
        num_augmented: how many of them get a multi-crop row (0 = none).
        global_size, local_size, num_local_crops: multi-crop settings (as in the recipe).
        seed: picks the samples and seeds the augmentation.

    Returns:
        dict with ``png`` (path), ``indices`` (sample ids shown), ``size`` (width, height).

    Raises:
        ValueError: ``out`` is not a local MDS dataset, or ``num_samples`` < 1.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    ds = _open_local(out)
    manifest_path = Path(out) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    names = dict(iter_label_names(manifest)) if manifest else {}
    rng = np.random.default_rng(seed)
    n = min(num_samples, len(ds))
    indices = sorted(int(i) for i in rng.choice(len(ds), size=n, replace=False))
    samples = [ds[i] for i in indices]
    images = [open_rgb(s["image"]) for s in samples]

    per_row = min(8, n)
    grid_rows = -(-n // per_row)
    aug_rows: list[list[Image.Image]] = []
    if num_augmented > 0:
        import torch

        from dvtrain.data.augment import MultiCropAugmentation
        from dvtrain.data.images import decode_image

        aug = MultiCropAugmentation(global_size, local_size, num_local_crops)
        torch.manual_seed(seed)
        for s in samples[:num_augmented]:
            views = aug(decode_image(s["image"]))
            crops = views["global_crops"] + views["local_crops"]
            aug_rows.append([_crop_to_image(c) for c in crops])
    cell_h = _CELL + _CAPTION
    aug_cols = 1 + (2 + num_local_crops if aug_rows else 0)
    width = max(per_row, aug_cols) * _CELL
    height = grid_rows * cell_h + (_CAPTION + len(aug_rows) * cell_h if aug_rows else 0)
    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)

    def caption(x: int, y: int, text: str, tile: int = _CELL) -> None:
        draw.text((x + 2, y + tile + 1), text[:22], fill=(0, 0, 0))

    for j, (i, s, img) in enumerate(zip(indices, samples, images)):
        x, y = (j % per_row) * _CELL, (j // per_row) * cell_h
        sheet.paste(_tile(img, _CELL), (x, y))
        label = int(s["label"])
        caption(x, y, f"{names.get(label, label)} #{i}")
    y0 = grid_rows * cell_h
    if aug_rows:
        draw.text((2, y0 + 1), f"multi-crop views: original | 2 global ({global_size}px) | "
                  f"{num_local_crops} local ({local_size}px)", fill=(0, 0, 0))
        y0 += _CAPTION
        for r, (img, crops) in enumerate(zip(images, aug_rows)):
            y = y0 + r * cell_h
            sheet.paste(_tile(img, _CELL), (0, y))
            caption(0, y, f"#{indices[r]}")
            for c, crop in enumerate(crops):
                x = (c + 1) * _CELL
                # local crops are drawn at their size relative to global crops
                side = _CELL if c < 2 else max(8, round(_CELL * local_size / global_size))
                top = y + (_CELL - side) // 2
                sheet.paste(_tile(crop, side), (x, top))
                caption(x, top, "global" if c < 2 else "local", side)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png_path, format="PNG")
    return {"png": str(png_path), "indices": indices, "size": sheet.size}
