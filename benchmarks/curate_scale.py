"""Curation at scale: near-duplicate search and two-level k-means over synthetic embeddings.

`python benchmarks/curate_scale.py [--n 1000000] [--dim 384] [--clusters 1000,32] [--steps 3]
 [--out report.md]`

Embeddings: N x D fp16 in a memory-mapped .npy (written in chunks, never whole in RAM), drawn as
a mixture of sqrt(N) Gaussian modes of random size (Zipf-like weights, so k-means meets the
dominant modes Vo et al. 2024 balance away) on the unit sphere, plus 1 % planted near copies
(cosine >= 0.99 of another row). What is timed, each from the memmap, as `dvtrain data curate`
runs it (:mod:`dvtrain.data.curate`):

1. near duplicates on the embeddings: ``dedup.cosine_pairs`` at cosine 0.98 (Faiss
   ``IndexIVFScalarQuantizer`` fp16, 2 sqrt(N) lists, nprobe 16): build, range search, recall of
   the planted copies;
2. near duplicates on 64-bit perceptual hashes: ``dedup.hamming_pairs`` radius 4 on N random
   codes with 1 % planted 2-bit variants (``IndexBinaryMultiHash``);
3. hierarchical k-means with resampling, two levels (``cluster.hierarchical_kmeans``) and
   balanced sampling of N/10 (``cluster.balanced_sample``).

Peak memory: the process's maximum resident set (``ru_maxrss``, which also counts the memmap's
file pages while they are resident). Goal: <= 10 minutes, <= 4 GiB on the 2-core dev machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_embeddings(path: Path, n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    num_modes = int(np.sqrt(n))
    centers = rng.normal(size=(num_modes, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, num_modes + 1) ** 0.8
    weights /= weights.sum()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    chunk = 65536
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centers[rng.choice(num_modes, m, p=weights)] + rng.normal(size=(m, d)).astype(np.float32) * 0.04
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x.astype(np.float16)
    # 1 % near copies: row j := row i + small noise (cosine >= 0.99)
    k = n // 100
    src = rng.choice(n, k, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), k, replace=False)
    for s in range(0, k, chunk):
        a = out[np.sort(src[s:s + chunk])].astype(np.float32)
        order = np.argsort(src[s:s + chunk])
        x = a + rng.normal(size=a.shape).astype(np.float32) * 0.002
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[dst[s:s + chunk][order]] = x.astype(np.float16)
    out.flush()
    del out
    return np.stack([src, dst], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", default="1000,32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import faiss

    from dvtrain.data.curate import cluster as cl
    from dvtrain.data.curate import dedup

    lines = [f"# curate scale benchmark: N = {args.n:,} x {args.dim} fp16", "",
             f"- host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"python {platform.python_version()}, faiss {faiss.__version__}, numpy {np.__version__}",
             f"- load before: `{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}`",
             f"- faiss threads: {faiss.omp_get_max_threads()}", ""]
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="curate-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        path = Path(tmp) / "emb.npy"
        t = time.time()
        planted = make_embeddings(path, args.n, args.dim)
        times["generate (not curation)"] = time.time() - t
        emb = np.load(path, mmap_mode="r")

        t = time.time()
        pairs = dedup.cosine_pairs(emb, 0.98, nprobe=args.nprobe)
        times["near duplicates: embedding range search"] = time.time() - t
        found = {tuple(sorted(p)) for p in pairs.tolist()}
        recall = np.mean([tuple(sorted(p)) in found for p in planted.tolist()])
        mem_near = peak_gib()

        rng = np.random.default_rng(1)
        codes = rng.integers(0, 256, size=(args.n, 8), dtype=np.uint8)
        k = args.n // 100
        src = rng.choice(args.n, k, replace=False)
        dst = rng.choice(np.setdiff1d(np.arange(args.n), src), k, replace=False)
        flips = np.zeros((k, 64), np.uint8)
        flips[np.arange(k), rng.integers(0, 64, k)] = 1
        flips[np.arange(k), rng.integers(0, 64, k)] = 1
        codes[dst] = codes[src] ^ np.packbits(flips, axis=1)
        t = time.time()
        hpairs = dedup.hamming_pairs(codes, 4)
        times["near duplicates: perceptual hash range search (radius 4)"] = time.time() - t
        hfound = {tuple(sorted(p)) for p in hpairs.tolist()}
        hrecall = np.mean([tuple(sorted(p)) in hfound for p in np.stack([src, dst], 1).tolist()])

        counts = [int(c) for c in args.clusters.split(",")]
        t = time.time()
        levels = cl.hierarchical_kmeans(emb, counts, resampling_steps=args.steps, niter=20)
        times[f"hierarchical k-means {counts}, {args.steps} resampling steps"] = time.time() - t
        t = time.time()
        chosen = cl.balanced_sample(levels, args.n // 10)
        times[f"balanced sampling to {args.n // 10:,}"] = time.time() - t
        leaf = levels[0]
        before = np.bincount(leaf, minlength=counts[0])
        after = np.bincount(leaf[chosen], minlength=counts[0])
    total = sum(v for k_, v in times.items() if "not curation" not in k_)
    lines += ["| step | seconds |", "|---|---|"]
    lines += [f"| {k_} | {v:.1f} |" for k_, v in times.items()]
    lines += [f"| **curation total** | **{total:.1f}** ({total / 60:.2f} min) |", "",
              f"- peak resident memory: {peak_gib():.2f} GiB (after near-dup search: {mem_near:.2f} GiB)",
              f"- embedding near-dup pairs: {len(pairs):,}; recall of the {len(planted):,} planted copies: {recall:.4f}",
              f"- hash near-dup pairs: {len(hpairs):,}; recall of planted 2-bit variants: {hrecall:.4f}",
              f"- leaf cluster sizes before sampling: max {before.max()}, median {int(np.median(before))}, "
              f"min {before.min()}; after: max {after.max()}, median {int(np.median(after))}, min {after.min()}",
              f"- load after: `{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
