"""``OUT/curation_report.png``: what curation did, in one picture.

Three panels, top to bottom: the leaf-cluster sizes before (grey) and after (blue) sampling,
largest first; a contact sheet of sample images of the largest leaf clusters (one row per
cluster); removed duplicates beside the image they duplicate (removed left, kept right).
Drawn with PIL only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dvtrain.data.curate.pool import Pool, open_payload

__all__ = ["write_report_png"]

_TILE = 64
_GAP = 4
_HIST_H = 160
_TEXT_H = 16


def _tile(pool: Pool, i: int) -> Image.Image:
    from dvtrain.data.inspect import _tile as fit_tile

    try:
        im = open_payload(pool.payload(i))[0]
    except Exception:  # noqa: BLE001 - a file removed since: show a grey tile
        return Image.new("RGB", (_TILE, _TILE), (128, 128, 128))
    return fit_tile(im, _TILE)


def write_report_png(path: str | Path, pool: Pool, report: dict[str, Any], emb, keep_e: np.ndarray,
                     cz, alive: np.ndarray, selected: np.ndarray, rows: int = 4, per_row: int = 8,
                     pairs: int = 8) -> Path:
    """Draw the report picture (see the module docstring) and save it as PNG.

    Args:
        path: output file. pool: the curated pool. report: the report dict (its ``clusters`` and
        ``removed`` entries are drawn). cz: the cluster stage's arrays (``level0``: leaf cluster
        of each kept embedding row). keep_e: embedding rows kept after deduplication. alive: pool
        index of each embedding row. selected: pool indices written.

    Returns:
        The path written.
    """
    before = np.asarray(report["clusters"]["leaf_sizes_before"], np.int64)
    after = np.asarray(report["clusters"]["leaf_sizes_after"], np.int64)
    order = np.argsort(-before, kind="stable")
    width = max(per_row * (_TILE + _GAP) + _GAP, 2 * (2 * _TILE + 3 * _GAP) + _GAP, 480)
    key_to_index = {k: i for i, k in enumerate(pool.keys)}
    by_stage: dict[str, list[tuple[int, int]]] = {"near": [], "exact": []}
    for r in report["removed"]:  # near duplicates first (the interesting ones), then exact
        if r["stage"] in by_stage and r.get("duplicate_of") in key_to_index and r["path"] in key_to_index:
            by_stage[r["stage"]].append((key_to_index[r["path"]], key_to_index[r["duplicate_of"]]))
    dup_pairs = (by_stage["near"][: pairs - min(len(by_stage["exact"]), pairs // 4)]
                 + by_stage["exact"])[:pairs]
    pair_rows = (len(dup_pairs) + 1) // 2
    height = (_TEXT_H + _HIST_H + _GAP + _TEXT_H + rows * (_TILE + _GAP) + _TEXT_H
              + max(1, pair_rows) * (_TILE + _GAP) + _GAP)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    y = 0
    c = report["counts"]
    draw.text((_GAP, y), f"leaf cluster sizes, largest first: before (grey, {int(before.sum())}) / "
              f"after (blue, {int(after.sum())}); selected {c['selected']} of {c['source']}",
              fill=(0, 0, 0))
    y += _TEXT_H
    if len(before):
        bar_w = max(1.0, (width - 2 * _GAP) / len(before))
        top = max(1, int(before.max()))
        for j, k in enumerate(order.tolist()):
            x0 = _GAP + j * bar_w
            for v, col in ((before[k], (180, 180, 180)), (after[k], (40, 90, 200))):
                h = int(round(_HIST_H * v / top))
                draw.rectangle([x0, y + _HIST_H - h, x0 + max(0.0, bar_w - 1), y + _HIST_H], fill=col)
    y += _HIST_H + _GAP
    draw.text((_GAP, y), f"samples of the {rows} largest leaf clusters (one row each)", fill=(0, 0, 0))
    y += _TEXT_H
    leaf = cz["level0"]
    rng = np.random.default_rng(0)
    for r, k in enumerate(order[:rows].tolist()):
        members = np.flatnonzero(leaf == k)
        pick = rng.choice(members, size=min(per_row, len(members)), replace=False) if len(members) else []
        for j, m in enumerate(pick):
            img.paste(_tile(pool, int(alive[keep_e[m]])), (_GAP + j * (_TILE + _GAP), y))
        y += _TILE + _GAP
    draw.text((_GAP, y), "removed duplicate (left) beside the image it duplicates (right)"
              if dup_pairs else "no duplicates removed", fill=(0, 0, 0))
    y += _TEXT_H
    for j, (a, b) in enumerate(dup_pairs):
        x = _GAP + (j % 2) * (2 * _TILE + 3 * _GAP + 8)
        yy = y + (j // 2) * (_TILE + _GAP)
        img.paste(_tile(pool, a), (x, yy))
        img.paste(_tile(pool, b), (x + _TILE + _GAP, yy))
    path = Path(path)
    img.save(path, format="PNG")
    return path
