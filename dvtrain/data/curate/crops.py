"""Cropped copies (part of stage 3, near duplicates): find images that are a crop of another.

A crop that removes a few percent of each side moves a 64-bit perceptual hash and a whole-image
embedding about as far as a different image of the same kind does (on Fashion-MNIST: a median of
10 bits for a 5-10 % crop, 2-4 bits between distinct look-alikes), so neither finds crops. This
module does it in two steps, both by pixel content:

1. **Candidates (Faiss).** Every image gets :data:`BOXES` grayscale thumbnails (16 x 16, mean
   removed, L2-normalised; the first is the whole image, the raw-pixel embedding of
   :mod:`.embed`; the others are sub-windows covering 95 % and 90 % of each side at 3 x 3
   positions, and of one side only at either end). A crop of image O looks like one of O's sub-windows, so each sub-window is
   searched against the whole-image thumbnails of the pool; the ``per_image`` best matches with
   cosine >= ``min_cos`` become candidate pairs (O, C, box).
2. **Verification (registration).** C is resized to every box size near the matched one and slid
   over O (O resized to ``side`` px on its longer side); the maximum normalised cross-correlation
   over box sizes and positions must reach ``ncc``. An exact crop scores 1.0; distinct images
   that share a silhouette stayed below 0.989 on the planted Fashion-MNIST pool
   (``benchmarks/curate_dedup.py``).

This stands in for the copy-detection embedding (SSCD) the DINOv2 paper (section 3) deduplicates
with, which dvtrain does not ship. Storage: ``len(BOXES) x 256`` fp16 per image (27 boxes, 13.8 KB)
in the work directory.

Shape legend: N images, B boxes (``len(BOXES)``), T = 256 thumbnail values.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image

__all__ = ["BOXES", "THUMB_SIDE", "crop_candidates", "crop_descriptors", "crop_ncc", "cropped_copies",
           "thumbnail"]

THUMB_SIDE = 16
# (width fraction, height fraction, horizontal position, vertical position); positions 0 = left /
# top, 1 = right / bottom: the whole image, crops of every side at 3 x 3 positions, crops of one side
BOXES: tuple[tuple[float, float, float, float], ...] = ((1.0, 1.0, 0.5, 0.5),) + tuple(
    (f, f, px, py) for f in (0.95, 0.9) for py in (0.0, 0.5, 1.0) for px in (0.0, 0.5, 1.0)) + tuple(
    box for f in (0.95, 0.9) for box in ((f, 1.0, 0.0, 0.5), (f, 1.0, 1.0, 0.5), (1.0, f, 0.5, 0.0),
                                          (1.0, f, 0.5, 1.0)))
_BOX_SLACK = 0.06  # verification tries box widths within +-6 % of the matched box's
_MIN_KEPT = 0.8  # and box heights of at least 80 % of the original's


def thumbnail(im: Image.Image) -> np.ndarray:
    """[T] float32: 16 x 16 grayscale box-filtered thumbnail, mean removed, unit L2 norm.

    The raw-pixel embedding (``--model pixels``) and the whole-image crop descriptor.
    """
    g = im.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    v = np.asarray(g, dtype=np.float32).reshape(-1)
    v = v - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-6)


def _box(w: int, h: int, box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    fw, fh, px, py = box
    bw, bh = w * fw, h * fh
    left, top = (w - bw) * px, (h - bh) * py
    return round(left), round(top), round(left + bw), round(top + bh)


def crop_descriptors(gray: Image.Image) -> np.ndarray:
    """[B, T] float16: :func:`thumbnail` of the whole image and of each sub-window of :data:`BOXES`.

    Args:
        gray: a decoded image (converted to grayscale here; any size >= 1 px).
    """
    g = gray.convert("L")
    w, h = g.size
    return np.stack([thumbnail(g.crop(_box(w, h, b))) for b in BOXES]).astype(np.float16)


def crop_candidates(originals: tuple[np.ndarray, np.ndarray],
                    copies: tuple[np.ndarray, np.ndarray] | None, min_cos: float,
                    per_image: int = 3, nprobe: int = 16, batch: int = 2048) -> np.ndarray:
    """Candidate (original, copy) pairs: a sub-window of the original resembles the whole copy.

    Args:
        originals: (desc [N_pool, B, T] fp16, rows [N] int64): descriptors (a memmap is read in
            batches) and the rows taking part; original positions index ``rows``.
        copies: the same for the images that may be copies (e.g. the pool, when the originals
            are an evaluation set); None = the originals themselves (self pairs dropped).
        min_cos: thumbnail cosine a candidate needs.
        per_image: best candidates kept per original.
        nprobe: IVF lists visited per query (above 50k copies).

    Returns:
        [P, 3] int64 (original position, copy position, index into :data:`BOXES`),
        P <= N * per_image.
    """
    from dvtrain.data.curate.dedup import _float_index  # one owner of the Faiss index choice

    same = copies is None
    o_desc, o_rows = originals
    c_desc, c_rows = originals if same else copies
    n, nb = len(o_rows), len(BOXES)
    if n == 0 or len(c_rows) < (2 if same else 1):
        return np.zeros((0, 3), np.int64)
    whole = np.concatenate([np.asarray(c_desc[c_rows[s:s + batch], 0], np.float32)
                            for s in range(0, len(c_rows), batch)])
    index = _float_index(whole, nprobe)
    k = min(per_image + 1, len(c_rows))
    out = []
    for s in range(0, n, batch):
        q = np.asarray(o_desc[o_rows[s:s + batch]], np.float32)  # [b, B, T]
        sims, ids = index.search(np.ascontiguousarray(q.reshape(-1, q.shape[-1])), k)
        sims, ids = sims.reshape(len(q), nb * k), ids.reshape(len(q), nb * k)
        boxes = np.repeat(np.arange(nb), k).tolist()
        for j in range(len(q)):
            o = s + j
            best: dict[int, tuple[float, int]] = {}
            for sim, c, b in zip(sims[j].tolist(), ids[j].tolist(), boxes):
                if c >= 0 and not (same and c == o) and sim >= min_cos and sim > best.get(c, (-2.0, 0))[0]:
                    best[c] = (sim, b)
            for c, (_, b) in sorted(best.items(), key=lambda kv: -kv[1][0])[:per_image]:
                out.append((o, c, b))
    return np.asarray(out, np.int64).reshape(-1, 3)


def _gray(im: Image.Image, scale: float) -> np.ndarray:
    w, h = im.size
    if scale != 1.0:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return np.asarray(im.convert("L"), np.float32)


def crop_ncc(copy: Image.Image, original: Image.Image, box: tuple[float, float, float, float],
             side: int = 64) -> float:
    """How well ``copy`` matches a crop of ``original``: the maximum normalised cross-correlation.

    ``original`` is resized to ``side`` px on its longer side; ``copy`` is resized to each box
    width within +-6 % of ``box``'s (its aspect ratio kept; box height >= 80 % of the original's)
    and slid over every position.

    Args:
        copy, original: decoded images. box: the matched entry of :data:`BOXES`.

    Returns:
        float in [-1, 1] (-1.0 when no box of the copy's aspect ratio fits in the original).
    """
    gray = original.convert("L")
    o = _gray(gray, side / max(gray.size)).astype(np.float64)
    ho, wo = o.shape
    o_f = np.fft.rfft2(o)
    # integral images of o and o^2: any window's sum in four lookups
    s1 = np.pad(o.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    s2 = np.pad((o * o).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    copy = copy.convert("L")
    wc, hc = copy.size
    f = box[0]  # width fraction; the height follows from the copy's aspect ratio
    lo, hi = int(np.floor((f - _BOX_SLACK) * wo)), min(wo, int(np.ceil((f + _BOX_SLACK) * wo)))
    sizes, padded, norms = [], [], []
    for bw in range(max(lo, 2), hi + 1):
        bh = round(bw * hc / wc)
        if bh > ho or bh < _MIN_KEPT * ho or bh < 2:
            continue
        t = np.asarray(copy.resize((bw, bh), Image.Resampling.BILINEAR), np.float64)
        t = t - t.mean()
        tn = float(np.linalg.norm(t))
        if tn < 1e-3:
            continue
        p = np.zeros((ho, wo))
        p[:bh, :bw] = t
        sizes.append((bh, bw))
        padded.append(p)
        norms.append(tn)
    if not sizes:
        return -1.0
    # cross-correlation by FFT, all box sizes at once (circular, but the valid offsets below never
    # wrap); t has zero mean, so the window mean drops out of the numerator
    corr = np.fft.irfft2(o_f[None] * np.conj(np.fft.rfft2(np.stack(padded))), s=(ho, wo))
    best = -1.0
    for (bh, bw), tn, num in zip(sizes, norms, corr):
        num = num[:ho - bh + 1, :wo - bw + 1]
        w1 = s1[bh:, bw:] - s1[:-bh, bw:] - s1[bh:, :-bw] + s1[:-bh, :-bw]
        w2 = s2[bh:, bw:] - s2[:-bh, bw:] - s2[bh:, :-bw] + s2[:-bh, :-bw]
        den = np.sqrt(np.maximum(w2 - w1 * w1 / (bh * bw), 0.0)) * tn
        best = max(best, float((num / np.maximum(den, 1e-6)).max()))
    return min(best, 1.0)


def _verify_chunk(items: list[tuple[Any, Any, int]]) -> list[float]:
    """:func:`crop_ncc` of (copy payload, original payload, box index) items, decoded here (in a
    worker process); -1.0 when either no longer decodes."""
    from dvtrain.data.curate.pool import open_payload

    scores = []
    for copy_payload, original_payload, b in items:
        try:
            scores.append(crop_ncc(open_payload(copy_payload)[0], open_payload(original_payload)[0],
                                   BOXES[b]))
        except Exception:  # noqa: BLE001 - changed on disk since the quality stage: no match
            scores.append(-1.0)
    return scores


def cropped_copies(originals: tuple[np.ndarray, np.ndarray, Callable[[int], Any]],
                   copies: tuple[np.ndarray, np.ndarray, Callable[[int], Any]] | None,
                   min_cos: float, ncc: float, per_image: int = 3, nprobe: int = 16,
                   workers: int = 1, on_progress: Callable[[int, int], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Verified cropped copies (:func:`crop_candidates`, then :func:`crop_ncc` per candidate in
    ``workers`` processes, :func:`dvtrain.data.shards.map_in_workers`).

    Args:
        originals: (desc [N_pool, B, T], rows [N], payload: row -> what
            :func:`.pool.open_payload` decodes; picklable when ``workers`` > 1).
        copies: the same for the possible copies; None = the originals themselves.
        min_cos: candidate thumbnail cosine. ncc: verification threshold (normalised
            cross-correlation, e.g. 0.995).
        on_progress: called with (candidates verified, candidates) every 256 and at the end.

    Returns:
        ([P, 2] int64 (original position, copy position), [P] float32 scores); positions index
        the ``rows`` of ``originals`` and ``copies``.
    """
    from dvtrain.data import shards

    cand = crop_candidates(originals[:2], None if copies is None else copies[:2], min_cos,
                           per_image, nprobe)
    o_rows, o_payload = originals[1], originals[2]
    c_rows, c_payload = (originals if copies is None else copies)[1:]
    items = [(c_payload(int(c_rows[c])), o_payload(int(o_rows[o])), b) for o, c, b in cand.tolist()]
    pairs, scores = [], []
    for k, s in enumerate(shards.map_in_workers(_verify_chunk, items, workers)):
        if s >= ncc - 1e-6:
            pairs.append(tuple(cand[k, :2].tolist()))
            scores.append(s)
        if on_progress and (k + 1) % 256 == 0:
            on_progress(k + 1, len(cand))
    if on_progress:
        on_progress(len(cand), len(cand))
    return np.asarray(pairs, np.int64).reshape(-1, 2), np.asarray(scores, np.float32)
