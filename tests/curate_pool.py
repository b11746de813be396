"""A curation test pool from the bundled Fashion-MNIST images, with planted problems.

Fashion-MNIST images are 28 x 28 grayscale; the pool upscales them to 64 x 64 (bicubic) so that
the planted resizes (0.5x-2x), crops and tiny images are meaningful, and the tests lower
``--min-side`` to 24 px accordingly.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dvtrain.data.fashion_mnist import load_fashion_mnist

SIDE = 64


def upscale(a: np.ndarray, side: int = SIDE) -> Image.Image:
    return Image.fromarray(a).resize((side, side), Image.Resampling.BICUBIC)


@dataclass
class PlantedPool:
    root: Path
    untouched: list[str] = field(default_factory=list)
    originals: list[str] = field(default_factory=list)
    copies: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # kind -> (copy, original)
    rejects: dict[str, list[str]] = field(default_factory=dict)  # kind -> files
    test_copies: list[str] = field(default_factory=list)
    against: Path | None = None


def build_pool(root: Path, num_base: int = 300, per_kind: int = 20, seed: int = 0,
               crop_fraction: float = 0.10) -> PlantedPool:
    """Write ``root/pool/*.png|jpg|bmp`` and ``root/against.npz``; return what was planted.

    Kinds planted (``per_kind`` each, originals drawn without replacement from the base images):
    exact file copies, lossless re-encodes (PNG -> BMP, same pixels), JPEG re-encodes (quality
    60-90), resized copies (0.5x-2x), cropped copies (up to ``crop_fraction`` of the width and of
    the height removed, random position), blurred (Gaussian radius 3), tiny (16 px) and corrupt
    (truncated PNG, random bytes) images, and copies of test-split images that ``against.npz``
    (the first 500 test images) holds.
    """
    rng = np.random.default_rng(seed)
    images, _ = load_fashion_mnist("train", limit=num_base)
    test_images, test_labels = load_fashion_mnist("test", limit=500)
    pool = root / "pool"
    pool.mkdir(parents=True)
    planted = PlantedPool(root)
    names = []
    for i, a in enumerate(images):
        name = f"base_{i:05d}.png"
        upscale(a).save(pool / name)
        names.append(name)
    kinds = ["exact", "lossless", "jpeg", "resized", "cropped"]
    chosen = rng.choice(len(names), size=len(kinds) * per_kind, replace=False)
    for k, kind in enumerate(kinds):
        planted.copies[kind] = []
        for j in chosen[k * per_kind:(k + 1) * per_kind].tolist():
            src = pool / names[j]
            im = Image.open(src)
            stem = f"{kind}_{j:05d}"
            if kind == "exact":
                dst = f"{stem}.png"
                shutil.copyfile(src, pool / dst)
            elif kind == "lossless":
                dst = f"{stem}.bmp"
                im.save(pool / dst)
            elif kind == "jpeg":
                dst = f"{stem}.jpg"
                im.convert("RGB").save(pool / dst, quality=int(rng.integers(60, 91)))
            elif kind == "resized":
                s = float(rng.uniform(0.5, 2.0))
                dst = f"{stem}.png"
                im.resize((round(SIDE * s), round(SIDE * s)), Image.Resampling.BICUBIC).save(pool / dst)
            else:
                dx = int(round(SIDE * crop_fraction * rng.random()))
                dy = int(round(SIDE * crop_fraction * rng.random()))
                left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
                dst = f"{stem}.png"
                im.crop((left, top, SIDE - (dx - left), SIDE - (dy - top))).save(pool / dst)
            planted.copies[kind].append((dst, names[j]))
    planted.originals = sorted({o for v in planted.copies.values() for _, o in v})
    planted.untouched = sorted(set(names) - set(planted.originals))
    rest = [n for n in planted.untouched]
    planted.rejects = {"blurred": [], "tiny": [], "corrupt": []}
    for j in range(per_kind // 2):
        a = images[rng.integers(len(images))]
        upscale(a).filter(ImageFilter.GaussianBlur(3)).save(pool / f"blurred_{j:03d}.png")
        planted.rejects["blurred"].append(f"blurred_{j:03d}.png")
        upscale(a, 16).save(pool / f"tiny_{j:03d}.png")
        planted.rejects["tiny"].append(f"tiny_{j:03d}.png")
        buf = io.BytesIO()
        upscale(a).save(buf, format="PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2] if j % 2 == 0 else rng.bytes(900)
        (pool / f"corrupt_{j:03d}.png").write_bytes(data)
        planted.rejects["corrupt"].append(f"corrupt_{j:03d}.png")
    for j in rng.choice(len(test_images), size=per_kind, replace=False).tolist():
        name = f"testcopy_{j:05d}.png"
        upscale(test_images[j]).save(pool / name)
        planted.test_copies.append(name)
    planted.against = root / "against.npz"
    np.savez(planted.against, images=test_images, labels=test_labels)
    del rest
    return planted
