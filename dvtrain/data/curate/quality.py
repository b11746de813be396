"""Stage 1 (quality) and the per-image scan the later stages reuse.

One decode per image (in ``workers`` processes) yields the image's size, whether its file is
lossy-compressed (a JPEG; this decides which copy of a duplicate group stays), a sharpness score,
its contrast, the SHA-1 of the file bytes, the SHA-1 of the decoded pixels (RGB) and a 64-bit
perceptual hash (``imagehash.phash``: DCT of a 32 x 32 grayscale thumbnail), and optionally the
crop descriptors of :mod:`.crops`. Rejections, each with its reason: the file does not read or
decode; the shorter side is below ``min_side``; the aspect ratio exceeds ``max_aspect``; the image
is blurred (variance of the Laplacian of the grayscale image, 0..255 scale, measured on a copy
whose longer side is at most 512 px, below ``min_sharpness``); the image is near-constant
(grayscale standard deviation below ``min_std``).

Reference: DINOv2 paper section 3 and appendix (the curation pipeline; the paper does not list its
quality filters, these are the usual ones); the variance of the Laplacian is Pech-Pacheco et al.
2000, "Diatom autofocusing in brightfield microscopy".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from dvtrain.data import shards
from dvtrain.data.curate.crops import crop_descriptors
from dvtrain.data.curate.pool import open_payload

__all__ = ["QualityThresholds", "scan_images", "sharpness", "quality_reason"]

_SHARPNESS_MAX_SIDE = 512
_JPEG_MAGIC = b"\xff\xd8\xff"  # JPEG / MPO files start with it (SOI + the next marker)


@dataclass(frozen=True)
class QualityThresholds:
    """Quality filter thresholds.

    Attributes:
        min_side: minimum shorter side (px).
        max_aspect: maximum longer/shorter side ratio.
        min_sharpness: minimum variance of the Laplacian (grayscale 0..255, longer side <= 512 px).
        min_std: minimum grayscale standard deviation (0..255); below it the image is near-constant.
    """

    min_side: int = 64
    max_aspect: float = 4.0
    min_sharpness: float = 20.0
    min_std: float = 4.0


def sharpness(gray_HW: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a grayscale image.

    Args:
        gray_HW: [H, W] grayscale, any real dtype, 0..255 scale; H, W >= 3.

    Returns:
        float, the variance over the interior pixels (0.0 for images smaller than 3 x 3).
    """
    g = np.asarray(gray_HW, dtype=np.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]) - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def _phash64(im: Image.Image) -> bytes:
    import imagehash

    return np.packbits(imagehash.phash(im, hash_size=8).hash.reshape(-1)).tobytes()


def _scan_one(payload: Any, with_crops: bool = False) -> dict[str, Any]:
    try:
        im, data = open_payload(payload)
    except Exception as e:  # noqa: BLE001 - any reader/decoder failure is a rejection reason
        return {"ok": False, "reason": "does not decode: " + shards.error_reason(e)}
    w, h = im.size
    rgb = im.convert("RGB")
    pixel_hash = hashlib.sha1(f"{w}x{h}".encode() + rgb.tobytes()).hexdigest()
    file_hash = hashlib.sha1(data).hexdigest() if data is not None else pixel_hash
    gray = rgb.convert("L")
    if max(w, h) > _SHARPNESS_MAX_SIDE:
        s = _SHARPNESS_MAX_SIDE / max(w, h)
        gray_s = gray.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    else:
        gray_s = gray
    g = np.asarray(gray_s, dtype=np.float32)
    rec = {"ok": True, "width": w, "height": h, "lossy": data is not None and data[:3] == _JPEG_MAGIC,
           "sharpness": sharpness(g), "std": float(g.std()),
           "file_hash": file_hash, "pixel_hash": pixel_hash, "phash": _phash64(gray).hex()}
    if with_crops:
        rec["crop_desc"] = crop_descriptors(gray)
    return rec


def _scan_chunk(chunk: list[Any], with_crops: bool = False) -> list[dict[str, Any]]:
    return [_scan_one(p, with_crops) for p in chunk]


def scan_images(payloads: Sequence[Any], workers: int = 1, chunk_size: int = 64,
                on_result: Callable[[int], None] | None = None,
                with_crops: bool = False) -> Iterator[dict[str, Any]]:
    """Decode and measure images, in order, in ``workers`` spawn processes (bounded memory;
    :func:`dvtrain.data.shards.map_in_workers`).

    Args:
        payloads: from :meth:`Pool.payload`.
        workers: processes (1 = in this process).
        on_result: called with the count of finished items after each chunk.

    Yields:
        One dict per payload: ``ok`` False with ``reason``, or ``width``, ``height`` (px),
        ``sharpness`` (variance of the Laplacian), ``std`` (grayscale std, 0..255), ``file_hash``,
        ``pixel_hash`` (SHA-1 hex), ``phash`` (16 hex digits, 64 bits), and with ``with_crops``
        ``crop_desc`` ([B, T] fp16, :func:`.crops.crop_descriptors`).
    """
    for done, rec in enumerate(shards.map_in_workers(_scan_chunk, payloads, workers, with_crops,
                                                     chunk_size=chunk_size), start=1):
        yield rec
        if on_result and (done % chunk_size == 0 or done == len(payloads)):
            on_result(done)


def quality_reason(rec: dict[str, Any], t: QualityThresholds) -> str | None:
    """The rejection reason of a scanned image under thresholds ``t``, or None when it passes."""
    if not rec["ok"]:
        return rec["reason"]
    w, h = rec["width"], rec["height"]
    if min(w, h) < t.min_side:
        return f"too small: {w}x{h} px, shorter side < --min-side {t.min_side}"
    if max(w, h) / min(w, h) > t.max_aspect:
        return f"extreme aspect ratio {max(w, h) / min(w, h):.2f} > --max-aspect {t.max_aspect}"
    if rec["std"] < t.min_std:
        return f"near-constant: grayscale std {rec['std']:.2f} < --min-std {t.min_std}"
    if rec["sharpness"] < t.min_sharpness:
        return (f"blurred: variance of the Laplacian {rec['sharpness']:.1f} < "
                f"--min-sharpness {t.min_sharpness}")
    return None
