"""Balanced sampling and retrieval on Fashion-MNIST with the embeddings available here.

`python benchmarks/curate_balance.py [--model CHECKPOINT] [--seeds 3] [--out report.md]`

1. Balancing: a 10:1 pool (T-shirt 600, Trouser 300, Sneaker 150, Bag 100, Ankle boot 60, the first
   images of each class in the bundled train split), labels hidden; hierarchical k-means with
   resampling at the default levels (sqrt N, N^(1/4)) and balanced sampling to 200, as
   ``dvtrain data curate --target-size 200`` runs them; largest / smallest class count of the
   sample, over several k-means/sampling seeds; uniform random sampling for comparison.
2. Retrieval: for each class, 25 test-split images of that class as the seed set, the 4 nearest
   of a pool; share of the retrieved images of the seed class. Two pools: 1,500 images (150 per
   class: the ~100 retrieved are two thirds of the class, a hard setting) and the whole bundled
   train split (20,000, ~2,000 per class: a pool much larger than what is retrieved, as in the
   DINOv2 paper's retrieval from 1.2B images).

Embedders: raw pixels (``--model pixels``), the randomly initialised main-job backbone
(recipes/smoke_cpu.yaml's ViT: 192 wide, 6 blocks, patch 7, 4 registers, SwiGLU, LayerScale 1.0),
and ``--model`` when given (e.g. the main job's ``runs/demo-*/export/teacher_backbone.pth``).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dvtrain.data.curate import cluster as cl
from dvtrain.data.curate.embed import Embedder
from dvtrain.data.fashion_mnist import CLASSES, load_fashion_mnist

IMBALANCE = {0: 600, 1: 300, 7: 150, 8: 100, 9: 60}


def imbalanced_pool(labels: np.ndarray, scale: int = 1) -> np.ndarray:
    """Indices of the imbalanced pool: the first ``scale * n`` images of each class of IMBALANCE."""
    return np.concatenate([np.flatnonzero(labels == c)[:scale * n] for c, n in IMBALANCE.items()])


def embed(e: Embedder, images: np.ndarray) -> np.ndarray:
    out = [e.embed_images([Image.fromarray(a) for a in images[s:s + 256]]) for s in range(0, len(images), 256)]
    return np.concatenate(out).astype(np.float16)


def sample_counts(x: np.ndarray, y: np.ndarray, cluster_counts: list[int], seed: int, target: int = 200,
                  resampling_steps: int = 3, points_per_cluster: int | None = None) -> np.ndarray:
    """Per-class counts (IMBALANCE's classes, in order) of a balanced sample of ``target`` of x, as
    ``dvtrain data curate --target-size`` draws it (labels y only counted, never used)."""
    levels = cl.hierarchical_kmeans(x, cluster_counts, resampling_steps=resampling_steps,
                                    points_per_cluster=points_per_cluster, seed=seed)
    return np.bincount(y[cl.balanced_sample(levels, target, seed=seed)], minlength=10)[list(IMBALANCE)]


def emit(lines: list[str], out: Path | None) -> None:
    """Print the report and write it to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)


def random_init_backbone(tmp: Path) -> str:
    from dvtrain.checkpoint.backbone import LoadedBackbone, backbone_kwargs
    from dvtrain.export import export_hub
    from dvtrain.models.vit import DinoVisionTransformer

    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=192, depth=6, num_heads=3, ffn_layer="swiglu",
                              num_register_tokens=4, layerscale_init=1.0, interpolate_offset=0.0,
                              interpolate_antialias=True).eval()
    path = tmp / "random_init.pth"
    export_hub(LoadedBackbone(m, backbone_kwargs(m), "random-init"), path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    idx = imbalanced_pool(labels)
    ridx = np.concatenate([np.flatnonzero(labels == c)[:150] for c in range(10)])
    lines = ["# balanced sampling and retrieval on Fashion-MNIST", "",
             f"load: `{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}`", "",
             "| embedding | class counts of the 200-image sample (T-shirt, Trouser, Sneaker, Bag, Ankle boot) per seed | largest / smallest per seed | retrieval from 1,500: share of the seed class, per class 0..9 | mean | retrieval from the 20,000 train split, per class 0..9 | mean |",
             "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    rnd = [np.bincount(labels[idx][rng.choice(len(idx), 200, replace=False)], minlength=10)[list(IMBALANCE)] for _ in range(args.seeds)]
    lines.append(f"| uniform random sampling (no embedding) | {' / '.join(str(r.tolist()) for r in rnd)} | "
                 f"{', '.join(f'{r.max() / max(r.min(), 1):.2f}' for r in rnd)} | - | - | - | - |")
    with tempfile.TemporaryDirectory() as tmp:
        models = [("raw pixels (16x16)", "pixels", 224), ("random-init main-job ViT", random_init_backbone(Path(tmp)), 28)]
        if args.model:
            models.append((f"`{args.model}`", args.model, 28))
        for name, model, size in models:
            e = Embedder(model, image_size=size)
            x = embed(e, images[idx])
            y = labels[idx]
            counts, ratios = [], []
            for seed in range(args.seeds):
                pc = sample_counts(x, y, cl.auto_cluster_counts(len(x)), seed)
                counts.append(pc.tolist())
                ratios.append(pc.max() / max(pc.min(), 1))
            full = embed(e, images)
            cells = []
            for pool, pool_labels in ((full[ridx], labels[ridx]), (full, labels)):
                shares = []
                for c in range(10):
                    seeds = embed(e, test_images[test_labels == c][:25])
                    got = np.unique(cl.retrieve(pool, seeds, 4).reshape(-1))
                    shares.append(float((pool_labels[got] == c).mean()))
                cells += [' '.join(f'{100 * s:.0f}%' for s in shares), f"{100 * np.mean(shares):.1f}%"]
            lines.append(f"| {name} | {' / '.join(map(str, counts))} | {', '.join(f'{r:.2f}' for r in ratios)} | "
                         + " | ".join(cells) + " |")
    lines += ["", f"classes: {', '.join(f'{i} {n}' for i, n in enumerate(CLASSES))}"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
