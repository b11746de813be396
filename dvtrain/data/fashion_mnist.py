"""The bundled Fashion-MNIST subset (``data/fashion_mnist/``, MIT, Zalando SE) as arrays.

20,000 train images (first records of the upstream train split) and the full 10,000-image test
split; see ``data/fashion_mnist/README.md``. Used by the main job (pretraining set, k-NN bank and
queries) and by tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dvtrain.data.shards import load_idx

__all__ = ["CLASSES", "FASHION_MNIST_DIR", "load_fashion_mnist"]

FASHION_MNIST_DIR = Path(__file__).resolve().parents[2] / "data" / "fashion_mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def load_fashion_mnist(split: str, limit: int | None = None,
                       root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the bundled Fashion-MNIST subset.

    Args:
        split: ``"train"`` (20,000 images) or ``"test"`` (10,000).
        limit: return only the first ``limit`` samples.
        root: directory holding the IDX files (default: the repository's ``data/fashion_mnist``).

    Returns:
        (images uint8 [N, 28, 28], labels int64 [N] in 0..9; names in ``CLASSES``).

    Raises:
        ValueError: unknown split, or the files are missing (the repository checkout is incomplete).
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    images_file, labels_file = (Path(root) / f for f in _FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise ValueError(f"Fashion-MNIST files not found in {root}: expected {images_file.name} "
                         f"and {labels_file.name} (see data/fashion_mnist/README.md)")
    images, labels = load_idx(images_file), load_idx(labels_file).astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels
