"""Stage 5: hierarchical k-means with resampling and balanced hierarchical sampling.

Reference: Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning: A
Clustering-Based Approach" (arXiv 2405.15613), section 4 and Algorithms 1-2, as used by DINOv3.
Level 1 clusters the embeddings, level t > 1 clusters the centroids of level t - 1. At each level,
after Faiss k-means, ``resampling_steps`` times: every point is assigned to its nearest centroid,
the ``r`` points nearest each centroid are taken, and k-means is refitted on them (started from
the current centroids); this moves centroids towards cluster cores and spreads them more evenly
over the data than plain k-means, whose centroids crowd into dense modes. Sampling goes top-down:
a node's budget is split evenly among its children, a child smaller than its share gives the rest
to its siblings (water-filling), and a leaf cluster gives a uniformly random subset of its points.

k-means runs on the GPU when faiss-gpu is installed and sees one (``faiss.Kmeans(gpu=True)``; not
tested here: the dev machines have no GPU), on the CPU otherwise.

Shape legend: N points, D width, K clusters at a level.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["auto_cluster_counts", "balanced_sample", "hierarchical_kmeans", "water_fill"]


def auto_cluster_counts(n: int) -> list[int]:
    """Default two levels for N points: [round(sqrt N), round(N ** 0.25)], each in [2, N]."""
    k1 = int(min(n, max(2, round(np.sqrt(n)))))
    k2 = int(min(k1, max(2, round(n ** 0.25))))
    return [k1, k2]


def _kmeans(x: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    import faiss

    # several restarts (best objective kept) for a first fit on few points (the upper levels
    # cluster centroids): one bad local minimum there merges separate modes
    nredo = 5 if init is None and len(x) <= 20_000 else 1
    gpu = bool(getattr(faiss, "get_num_gpus", lambda: 0)())  # faiss-gpu installed and a GPU seen
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, nredo=nredo, gpu=gpu,
                      max_points_per_centroid=256, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32),
             init_centroids=None if init is None else np.ascontiguousarray(init, np.float32))
    return km.centroids.copy()


def _assign(x: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    labels = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float32)
    for s in range(0, len(x), batch):
        d, i = index.search(np.ascontiguousarray(x[s:s + batch], np.float32), 1)
        labels[s:s + batch], dist[s:s + batch] = i[:, 0], d[:, 0]
    return labels, dist


def hierarchical_kmeans(x_ND: np.ndarray, cluster_counts: Sequence[int], resampling_steps: int = 3,
                        points_per_cluster: int | None = None, niter: int = 20,
                        seed: int = 0) -> list[np.ndarray]:
    """Hierarchical k-means with resampling (Vo et al. 2024, Algorithm 1).

    Args:
        x_ND: [N, D] embeddings (fp16/fp32; a memmap is read in batches for assignment).
        cluster_counts: K per level, bottom (finest) first, non-increasing.
        resampling_steps: refits on the points nearest each centroid, per level.
        points_per_cluster: r, points taken per centroid when resampling (default: the median
            cluster size of the level, at least 4).
        niter: Faiss k-means iterations per fit.
        seed: k-means seed.

    Returns:
        One int64 array per level: level 0 maps each point to its level-0 cluster [N]; level t
        maps each level-(t-1) cluster to its level-t cluster [K_{t-1}].

    Raises:
        ValueError: a cluster count < 1 or larger than the items of its level.
    """
    assignments: list[np.ndarray] = []
    data = x_ND
    for level, k in enumerate(cluster_counts):
        if k < 1 or k > len(data):
            raise ValueError(f"--clusters: level {level + 1} asks for {k} clusters but has "
                             f"{len(data)} items to cluster; give counts between 1 and {len(data)}")
        train = data if level > 0 or len(data) <= 256 * k else \
            data[np.sort(np.random.default_rng(seed).choice(len(data), 256 * k, replace=False))]
        centroids = _kmeans(np.asarray(train, np.float32), k, niter, seed + level)
        for step in range(resampling_steps):
            labels, dist = _assign(data, centroids)
            sizes = np.bincount(labels, minlength=k)
            r = points_per_cluster or max(4, int(np.median(sizes[sizes > 0])))
            order = np.lexsort((dist, labels))  # by cluster, nearest first
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            rank_in_cluster = np.arange(len(order)) - np.repeat(starts, sizes)
            chosen = np.sort(order[rank_in_cluster < r])
            if len(chosen) < k:
                break
            if len(chosen) > 256 * k:  # what Faiss would subsample to anyway; bounds memory
                chosen = np.sort(np.random.default_rng(seed + step).choice(chosen, 256 * k, replace=False))
            centroids = _kmeans(np.asarray(data[chosen], np.float32), k, niter,
                                seed + 1000 * (step + 1) + level, init=centroids)
        labels, _ = _assign(data, centroids)
        assignments.append(labels)
        data = centroids
    return assignments


def water_fill(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``budget`` items among groups as evenly as their ``sizes`` allow.

    Args:
        sizes: [G] int, items available per group.
        budget: items to take, <= sizes.sum().

    Returns:
        [G] int counts, counts <= sizes, sum = budget; groups too small to reach the even share
        give everything, the rest get the even share (remainders to random groups).
    """
    sizes = np.asarray(sizes, np.int64)
    take = np.zeros_like(sizes)
    left = int(min(budget, sizes.sum()))
    open_ = np.flatnonzero(sizes > 0)
    while left > 0 and len(open_):
        share = left // len(open_)
        small = open_[sizes[open_] - take[open_] <= share]
        if len(small) and share > 0:
            left -= int((sizes[small] - take[small]).sum())
            take[small] = sizes[small]
            open_ = np.setdiff1d(open_, small)
            continue
        if share > 0:
            take[open_] += share
            left -= share * len(open_)
        extra = rng.choice(open_, size=min(left, len(open_)), replace=False)
        take[extra] += 1
        left -= len(extra)
        open_ = open_[take[open_] < sizes[open_]]
    return take


def balanced_sample(assignments: Sequence[np.ndarray], target: int, seed: int = 0) -> np.ndarray:
    """Balanced hierarchical sampling (Vo et al. 2024, Algorithm 2, random sampling in leaves).

    Args:
        assignments: output of :func:`hierarchical_kmeans`.
        target: number of points to select, <= N.

    Returns:
        [target] sorted int64 point indices.

    Raises:
        ValueError: target > N.
    """
    rng = np.random.default_rng(seed)
    n = len(assignments[0])
    if target > n:
        raise ValueError(f"--target-size {target} is larger than the {n} images left after "
                         f"filtering and deduplication; choose at most {n}")
    # members[t][c]: the children (level t-1 clusters, or points for t = 0) of cluster c at level t
    members = []
    for t, a in enumerate(assignments):
        num_clusters = len(assignments[t + 1]) if t + 1 < len(assignments) else int(a.max()) + 1
        order = np.argsort(a, kind="stable")
        bounds = np.searchsorted(a[order], np.arange(num_clusters + 1))
        members.append([order[bounds[c]:bounds[c + 1]] for c in range(num_clusters)])
    # points under each cluster of each level
    sizes = [np.bincount(assignments[0], minlength=len(members[0]))]
    for t in range(1, len(assignments)):
        sizes.append(np.bincount(assignments[t], weights=sizes[t - 1],
                                 minlength=len(members[t])).astype(np.int64))
    top = len(assignments) - 1
    picked: list[np.ndarray] = []

    def descend(level: int, clusters: np.ndarray, budget: int) -> None:
        counts = water_fill(sizes[level][clusters], budget, rng)
        for c, m in zip(clusters.tolist(), counts.tolist()):
            if m == 0:
                continue
            if level == 0:
                picked.append(rng.choice(members[0][c], size=m, replace=False))
            else:
                descend(level - 1, members[level][c], m)

    descend(top, np.arange(len(members[top])), target)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def retrieve(pool_emb: np.ndarray, seed_emb: np.ndarray, k: int, nprobe: int = 16) -> np.ndarray:
    """Stage 6: the ``k`` nearest pool images (cosine) of every seed image, DINOv2 retrieval.

    Reference: DINOv2 paper section 3 ("Self-supervised image retrieval": the k nearest
    neighbours of each curated image in the uncurated pool). Exact ``IndexFlatIP`` up to 100k
    pool images, ``IndexIVFFlat`` (4 sqrt(N) lists, ``nprobe``) above.

    Args:
        pool_emb: [N, D] L2-normalised. seed_emb: [S, D] L2-normalised. k: neighbours per seed.

    Returns:
        [S, min(k, N)] int64 pool positions, nearest first.
    """
    import faiss

    d = pool_emb.shape[1]
    k = min(k, len(pool_emb))
    if len(pool_emb) <= 100_000:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(len(pool_emb)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = pool_emb[np.sort(rng.choice(len(pool_emb), min(len(pool_emb), 64 * nlist), replace=False))]
        index.train(np.ascontiguousarray(sample, np.float32))
        index.nprobe = nprobe
    for s in range(0, len(pool_emb), 65536):
        index.add(np.ascontiguousarray(pool_emb[s:s + 65536], np.float32))
    _, ids = index.search(np.ascontiguousarray(seed_emb, np.float32), k)
    return ids.astype(np.int64)
