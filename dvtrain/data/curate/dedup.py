"""Stages 2 and 3: exact and near duplicates, and duplicates of an evaluation set.

Exact (stage 2): equal SHA-1 of the file bytes, then equal SHA-1 of the decoded RGB pixels and
size (a lossless re-encode, e.g. PNG -> BMP, is an exact duplicate); the first in pool order stays.

Near (stage 3): two images are near duplicates when their 64-bit perceptual hashes are within
``radius`` bits (Faiss binary index range search: exact ``IndexBinaryFlat`` up to 200k images,
multi-index hashing ``IndexBinaryMultiHash`` above, exact for radius < 8) and the cosine
similarity of their embeddings confirms it (>= ``verify_cos``), or when the cosine similarity of
their embeddings alone reaches ``cos_threshold`` (Faiss inner-product range search on the
L2-normalised embeddings: exact ``IndexFlatIP`` up to 50k images, above it an inverted file
(``IndexIVFScalarQuantizer`` with fp16 codes, 2 sqrt(N) lists, ``nprobe`` visited per query)). The
pairs, with the cropped copies of :mod:`.crops`, form a graph; from each connected group one image
stays (the largest, then a lossless file before a JPEG, then the sharpest, then the first; JPEG
block artefacts raise the sharpness score, so sharpness alone would keep a re-encode over its
original), the others are removed as ``duplicate_of`` it. ``--against``: a pool image within the
same radius / threshold of any image of the evaluation set, or a verified crop / rescale of one
(:mod:`.crops`), is removed.

Reference: DINOv2 paper section 3 ("Deduplication": copy detection with SSCD embeddings and
connected components; removal of near-duplicates of evaluation images). The embedding here is the
one of ``--model`` (the paper's copy-detection network is not available in dvtrain).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["connected_groups", "cosine_pairs", "exact_duplicates", "hamming_pairs", "phash_array",
           "keep_order"]

_FLAT_BINARY_MAX = 200_000
_FLAT_FLOAT_MAX = 50_000


def phash_array(hex_hashes: Sequence[str]) -> np.ndarray:
    """[N, 8] uint8 codes from 16-hex-digit perceptual hashes."""
    return np.frombuffer(bytes.fromhex("".join(hex_hashes)), dtype=np.uint8).reshape(-1, 8).copy()


def exact_duplicates(file_hash: Sequence[str], pixel_hash: Sequence[str]) -> list[tuple[int, int, str]]:
    """Exact duplicates, in pool order.

    Args:
        file_hash, pixel_hash: [N] hex digests of the candidates (pool order).

    Returns:
        (position, position of the copy that stays, reason) for every duplicate.
    """
    out: list[tuple[int, int, str]] = []
    seen_file: dict[str, int] = {}
    seen_pixel: dict[str, int] = {}
    for i, (fh, ph) in enumerate(zip(file_hash, pixel_hash)):
        if fh in seen_file:
            out.append((i, seen_file[fh], "identical file bytes"))
        elif ph in seen_pixel:
            out.append((i, seen_pixel[ph], "identical decoded pixels"))
        else:
            seen_file[fh] = i
            seen_pixel[ph] = i
    return out


def _binary_index(codes: np.ndarray, radius: int):
    import faiss

    if len(codes) <= _FLAT_BINARY_MAX or radius >= 8:
        index = faiss.IndexBinaryFlat(64)
    else:
        nhash = radius + 1  # pigeonhole: some 64/nhash-bit substring matches exactly
        index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.add(codes)
    return index


def _range_results(index, queries: np.ndarray, radius: float, batch: int):
    """Yield (query offset, lims, ids, distances) per batch of a Faiss range search."""
    for start in range(0, len(queries), batch):
        lims, dist, ids = index.range_search(queries[start:start + batch], radius)
        yield start, lims.astype(np.int64), ids, dist


def hamming_pairs(codes: np.ndarray, radius: int, queries: np.ndarray | None = None,
                  batch: int = 4096) -> np.ndarray:
    """Pairs of 64-bit codes within ``radius`` bits (Faiss binary range search).

    Args:
        codes: [N, 8] uint8 indexed codes.
        radius: Hamming distance (bits), inclusive.
        queries: [M, 8] uint8; None = the indexed codes themselves (self-pairs dropped, i < j).

    Returns:
        [P, 2] int64 (query position, indexed position).
    """
    if len(codes) == 0 or radius < 0:
        return np.zeros((0, 2), np.int64)
    index = _binary_index(codes, radius)
    q = codes if queries is None else queries
    ranges = ((start, lims, ids) for start, lims, ids, _ in _range_results(index, q, radius + 1, batch))  # d < r
    return _pairs(ranges, self_query=queries is None)


def _pairs(ranges, self_query: bool) -> np.ndarray:
    """[P, 2] int64 (query position, indexed position) from Faiss range-search batches
    ``(first query position, lims, ids)``; for a self query only pairs i < j are kept."""
    out = []
    for start, lims, ids in ranges:
        rows = np.repeat(np.arange(len(lims) - 1), np.diff(lims)) + start
        out.append(np.stack([rows, ids.astype(np.int64)], axis=1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), np.int64)
    return pairs[pairs[:, 0] < pairs[:, 1]] if self_query else pairs


def _float_index(emb: np.ndarray, nprobe: int):
    import faiss

    d = emb.shape[1]
    if len(emb) <= _FLAT_FLOAT_MAX:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(2 * np.sqrt(len(emb)))
        quantizer = faiss.IndexFlatIP(d)
        # vectors stored as fp16 (what the embedding memmap holds: no precision lost, half the RAM)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = emb[np.sort(rng.choice(len(emb), min(len(emb), 40 * nlist), replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = nprobe
    for start in range(0, len(emb), 65536):
        index.add(np.ascontiguousarray(emb[start:start + 65536], dtype=np.float32))
    return index


def cosine_pairs(emb: np.ndarray, threshold: float, queries: np.ndarray | None = None,
                 nprobe: int = 8, batch: int = 4096) -> np.ndarray:
    """Pairs of L2-normalised embeddings with cosine similarity >= ``threshold`` (Faiss range search).

    Args:
        emb: [N, D] fp16/fp32 (a memmap is read in batches).
        threshold: cosine similarity in (-1, 1].
        queries: [M, D]; None = ``emb`` itself (self-pairs dropped, i < j).
        nprobe: IVF lists visited per query (pools above 50k images).

    Returns:
        [P, 2] int64 (query position, indexed position).
    """
    if len(emb) == 0:
        return np.zeros((0, 2), np.int64)
    index = _float_index(emb, nprobe)
    q_all = emb if queries is None else queries

    def ranges():
        for start in range(0, len(q_all), batch):
            q = np.ascontiguousarray(q_all[start:start + batch], dtype=np.float32)
            lims, _, ids = index.range_search(q, float(threshold) - 1e-6)
            yield start, lims.astype(np.int64), ids

    return _pairs(ranges(), self_query=queries is None)


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph (union-find with path halving).

    Args:
        n: number of nodes.
        pairs: [P, 2] int edges.

    Returns:
        [n] int64 component id per node (the smallest node index of its component).
    """
    parent = np.arange(n, dtype=np.int64)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def keep_order(area: np.ndarray, sharp: np.ndarray, lossy: np.ndarray | None = None) -> np.ndarray:
    """[N] rank: lower = preferred to keep (largest area, then lossless before lossy, then
    sharpest, then first). ``lossy``: [N] bool, True for a JPEG file (None: all lossless)."""
    lossy = np.zeros(len(area), bool) if lossy is None else np.asarray(lossy, bool)
    order = np.lexsort((np.arange(len(area)), -sharp, lossy, -area))
    rank = np.empty(len(area), np.int64)
    rank[order] = np.arange(len(area))
    return rank


def _verified(pairs: np.ndarray, a_emb, b_emb, verify_cos: float | None) -> np.ndarray:
    """Keep the (a, b) pairs whose embeddings have cosine >= verify_cos (all when None)."""
    if verify_cos is None or a_emb is None or b_emb is None or len(pairs) == 0:
        return pairs
    keep = np.zeros(len(pairs), bool)
    for s in range(0, len(pairs), 65536):
        p = pairs[s:s + 65536]
        a = np.asarray(a_emb[np.sort(np.unique(p[:, 0]))], np.float32)  # gather without fancy
        ia = {v: k for k, v in enumerate(np.sort(np.unique(p[:, 0])).tolist())}
        b = np.asarray(b_emb[np.sort(np.unique(p[:, 1]))], np.float32)
        ib = {v: k for k, v in enumerate(np.sort(np.unique(p[:, 1])).tolist())}
        ra = a[[ia[x] for x in p[:, 0].tolist()]]
        rb = b[[ib[x] for x in p[:, 1].tolist()]]
        keep[s:s + len(p)] = (ra * rb).sum(1) >= verify_cos - 1e-6
    return pairs[keep]


def near_duplicates(codes: np.ndarray, emb: np.ndarray | None, area: np.ndarray,
                    sharp: np.ndarray, radius: int, cos_threshold: float | None,
                    verify_cos: float | None = None, nprobe: int = 8,
                    extra: Sequence[tuple[str, np.ndarray]] = (),
                    lossy: np.ndarray | None = None) -> list[tuple[int, int, str]]:
    """Near duplicates within a pool (see the module docstring for the rule).

    Args:
        codes: [N, 8] uint8 perceptual hashes. emb: [N, D] L2-normalised embeddings (or None).
        area: [N] pixels, sharp: [N] sharpness, lossy: [N] bool, JPEG file (None: all
            lossless); these decide which copy of a group stays (:func:`keep_order`). radius: bits.
        cos_threshold: embedding-only threshold (None: off). verify_cos: confirmation threshold
            of hash pairs (None: hash pairs need no confirmation).
        extra: more duplicate pairs found elsewhere, as (reason text, [P, 2] int positions), e.g.
            the cropped copies of :mod:`.crops`.

    Returns:
        (position removed, position kept, reason) per removed image.
    """
    n = len(codes)
    hash_text = f"perceptual hash within {radius} bits" + (
        f" and embedding cosine >= {verify_cos}" if verify_cos is not None and emb is not None else "")
    found = [(hash_text, _verified(hamming_pairs(codes, radius), emb, emb, verify_cos))]
    if emb is not None and cos_threshold is not None:
        found.append((f"embedding cosine >= {cos_threshold}", cosine_pairs(emb, cos_threshold, nprobe=nprobe)))
    found += [(text, np.asarray(ps, np.int64).reshape(-1, 2)) for text, ps in extra]
    pairs = np.concatenate([ps for _, ps in found])
    reason_of: dict[tuple[int, int], str] = {}
    for text, ps in found:
        for a, b in ps.tolist():
            reason_of.setdefault((min(a, b), max(a, b)), text)
    group = connected_groups(n, pairs)
    rank = keep_order(area, sharp, lossy)
    keeper: dict[int, int] = {}
    for i in np.argsort(rank, kind="stable").tolist():
        keeper.setdefault(int(group[i]), i)
    out = []
    for i in range(n):
        k = keeper[int(group[i])]
        if k != i:
            detail = reason_of.get((min(i, k), max(i, k)),
                                   "in the same near-duplicate group (linked through other copies)")
            out.append((i, k, f"near duplicate: {detail}"))
    return out


def against_duplicates(codes: np.ndarray, emb: np.ndarray | None, eval_codes: np.ndarray,
                       eval_emb: np.ndarray | None, radius: int, cos_threshold: float | None,
                       verify_cos: float | None = None,
                       nprobe: int = 8) -> dict[int, tuple[int, str]]:
    """Pool positions that duplicate an evaluation image, by the same rule as
    :func:`near_duplicates`: {pool position: (evaluation position, reason)}."""
    hits: dict[int, tuple[int, str]] = {}
    hash_text = f"perceptual hash within {radius} bits" + (
        f" and embedding cosine >= {verify_cos}" if verify_cos is not None and emb is not None else "")
    pairs = _verified(hamming_pairs(eval_codes, radius, queries=codes), emb, eval_emb, verify_cos)
    for q, e in pairs.tolist():
        hits.setdefault(q, (e, f"duplicates an evaluation image ({hash_text})"))
    if emb is not None and eval_emb is not None and cos_threshold is not None:
        for q, e in cosine_pairs(eval_emb, cos_threshold, queries=emb, nprobe=nprobe).tolist():
            hits.setdefault(q, (e, f"duplicates an evaluation image (embedding cosine >= {cos_threshold})"))
    return hits
