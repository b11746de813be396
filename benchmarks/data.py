"""Data pipeline throughput.

`OMP_NUM_THREADS=1 python benchmarks/data.py [--quick] [--skip-loader] [--repeats N] [--workers N] [--out report.md]`

1. Loader: images/s of MDS shards + StreamingDataset + multi-crop + collate (``build_loader``)
   vs torchvision ``ImageFolder`` (PIL loader) + the identical ``MultiCropAugmentation`` and
   ``collate_multicrop``, same images, same workers, batch size and crop settings
   (2 x 224 + 8 x 98, patch 14 masks). Goal >= 1.0x.
2. Augmentation, one core: ``MultiCropAugmentation`` (uint8 tensors, fused float kernels) vs the
   reference recipe composed as ``dinov2/data/augmentations.py`` does it (PIL ColorJitter,
   torchvision GaussianBlur on PIL via RandomApply with the reference's inverted probabilities,
   RandomSolarize, ToTensor + Normalize), same images, ``torch.set_num_threads(1)``; medians of
   interleaved passes (ours, reference, ours, ...) after a warm-up, so background load hits both
   alike. Goal >= 1.5x.
3. Profile (cProfile, one core): the functions that dominate each augmentation.

Images: distinct JPEGs (crops of scikit-learn's two bundled photos china.jpg / flower.jpg,
500 x 375 like ImageNet's median) and Fashion-MNIST 28 x 28 images from data/fashion_mnist (the
main job's data; PNG files for the loader, decoded arrays for the augmentation).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dvtrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation  # noqa: E402
from dvtrain.data.collate import collate_multicrop  # noqa: E402
from dvtrain.data.loader import build_loader, decode_image  # noqa: E402
from dvtrain.data.shards import convert_to_mds, load_idx  # noqa: E402

GLOBAL, LOCAL, N_LOCAL, PATCH = 224, 98, 8, 14  # local 98 = 7 patches of 14 (dinov2 vits14 recipe)


# ---------------------------------------------------------------------------------------------
# image sets


def make_photo_folder(root: Path, n: int, seed: int = 0) -> None:
    """n distinct 500x375 / 375x500 JPEGs (q90) cut from scikit-learn's photos, 2 classes."""
    import sklearn.datasets

    src = Path(sklearn.datasets.__file__).parent / "images"
    photos = {"china": Image.open(src / "china.jpg").convert("RGB"),
              "flower": Image.open(src / "flower.jpg").convert("RGB")}
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "china" if i % 2 == 0 else "flower"
        im = photos[cls]
        w, h = im.size
        cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        crop = im.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (root / cls).mkdir(parents=True, exist_ok=True)
        crop.save(root / cls / f"{i:05d}.jpg", quality=90)


def make_fmnist_folder(root: Path, n: int) -> None:
    """The first n Fashion-MNIST train images as PNG files in class folders."""
    images = load_idx(REPO / "data/fashion_mnist/train-images-idx3-ubyte.gz")[:n]
    labels = load_idx(REPO / "data/fashion_mnist/train-labels-idx1-ubyte.gz")[:n]
    for i, (a, y) in enumerate(zip(images, labels)):
        (root / f"{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / f"{y}" / f"{i:05d}.png")


# ---------------------------------------------------------------------------------------------
# loaders


def _collate():
    return functools.partial(collate_multicrop, n_tokens=(GLOBAL // PATCH) ** 2)


class _ImageFolderCollate:
    def __init__(self) -> None:
        self.inner = _collate()

    def __call__(self, batch):
        return self.inner([{**s, "label": t} for s, t in batch])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _time_epochs(make_iter, batch_size: int, epochs: int) -> list[float]:
    """images/s per epoch, excluding the first batch (worker start-up and first decode)."""
    rates = []
    for _ in range(epochs):
        it = make_iter()
        next(it)
        t0, n = time.perf_counter(), 0
        for _batch in it:
            n += batch_size
        rates.append(n / (time.perf_counter() - t0))
    return rates


def bench_loaders(folder: Path, mds: Path, workers: int, batch_size: int, epochs: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    aug = MultiCropAugmentation(GLOBAL, LOCAL, N_LOCAL)
    ours = build_loader(local=str(mds), batch_size=batch_size, transform=aug,
                        collate_fn=_collate(), num_workers=workers, shuffle=True, seed=0,
                        drop_last=True, clean_stale_shm=False, persistent_workers=False)
    ref_ds = ImageFolder(str(folder), transform=aug)
    ref = DataLoader(ref_ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                     collate_fn=_ImageFolderCollate(), drop_last=True,
                     worker_init_fn=_worker_init, persistent_workers=False)
    # interleave the two so background load hits both alike
    r_ours, r_ref = [], []
    for _ in range(epochs):
        r_ours += _time_epochs(lambda: iter(ours), batch_size, 1)
        r_ref += _time_epochs(lambda: iter(ref), batch_size, 1)
    return {"ours": statistics.median(r_ours), "ref": statistics.median(r_ref),
            "ours_all": r_ours, "ref_all": r_ref, "images": len(ref_ds)}


# ---------------------------------------------------------------------------------------------
# augmentation on one core


def reference_recipe():
    """dinov2/data/augmentations.py DataAugmentationDINO, composed from torchvision v1 on PIL."""
    from torchvision import transforms as T

    def blur(p):  # dinov2/data/transforms.py GaussianBlur: RandomApply with 1 - p
        return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=1 - p)

    geo_g = T.Compose([T.RandomResizedCrop(GLOBAL, scale=(0.32, 1.0),
                                           interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(p=0.5)])
    geo_l = T.Compose([T.RandomResizedCrop(LOCAL, scale=(0.05, 0.32),
                                           interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(p=0.5)])
    jitter = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                        T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    g1 = T.Compose([jitter, blur(1.0), norm])
    g2 = T.Compose([jitter, blur(0.1), T.RandomSolarize(threshold=128, p=0.2), norm])
    loc = T.Compose([jitter, blur(0.5), norm])

    def run(image):
        return {"global_crops": [g1(geo_g(image)), g2(geo_g(image))],
                "local_crops": [loc(geo_l(image)) for _ in range(N_LOCAL)]}

    return run


def fmnist_images(n: int) -> tuple[list[torch.Tensor], list[Image.Image]]:
    """The first n bundled Fashion-MNIST train images: uint8 [1, 28, 28] tensors and RGB PIL images."""
    from dvtrain.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("train", limit=n)
    return ([torch.from_numpy(a.copy()).unsqueeze(0) for a in images],
            [Image.fromarray(a).convert("RGB") for a in images])


def _rate(fn, inputs) -> float:
    t0 = time.perf_counter()
    for x in inputs:
        fn(x)
    return len(inputs) / (time.perf_counter() - t0)


def bench_interleaved(cases: dict[str, tuple], repeats: int) -> dict[str, list[float]]:
    """images/s of each ``name: (fn, inputs)`` over ``repeats`` interleaved passes, one core.

    One warm-up pass each over a quarter of the inputs (allocator, lazy imports), then passes
    ordered ours, ref, ours, ref, ... with the order rotated every repeat, so background load and
    clock drift hit every case alike. Returns every pass's rate; report the medians.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = list(cases)
    for fn, inputs in cases.values():
        _rate(fn, inputs[: max(1, len(inputs) // 4)])
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            fn, inputs = cases[k]
            rates[k].append(_rate(fn, inputs))
    return rates


def bench_augment(jpegs: list[bytes], n_fmnist: int, repeats: int) -> list[dict]:
    """Ours vs the reference recipe: photos (decoded; decode + augment) and Fashion-MNIST (decoded)."""
    ours = MultiCropAugmentation(GLOBAL, LOCAL, N_LOCAL)
    ref = reference_recipe()
    pils = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    tensors = [decode_image(b) for b in jpegs]
    fm_tensors, fm_pils = fmnist_images(n_fmnist)
    sets = (
        (f"photos 500x375, decoded ({len(jpegs)})", {"ours": (ours, tensors), "ref": (ref, pils)}),
        (f"photos 500x375, JPEG decode + augmentation ({len(jpegs)})",
         {"ours": (lambda b: ours(decode_image(b)), jpegs),
          "ref": (lambda b: ref(Image.open(io.BytesIO(b)).convert("RGB")), jpegs)}),
        (f"Fashion-MNIST 28x28, decoded ({n_fmnist})", {"ours": (ours, fm_tensors), "ref": (ref, fm_pils)}),
    )
    rows = []
    for label, cases in sets:
        r = bench_interleaved(cases, repeats)
        rows.append({"label": label, "ours": statistics.median(r["ours"]),
                     "ref": statistics.median(r["ref"]), "ours_all": r["ours"], "ref_all": r["ref"]})
        print(f"{label}: ours {[round(v) for v in r['ours']]} ref {[round(v) for v in r['ref']]}",
              flush=True)
    return rows


def profile(fn, inputs, top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """cProfile one core: (tottime share in percent of the ``top`` most expensive functions,
    cumtime share of each stage of ``dvtrain/data/augment.py`` that ran)."""
    torch.set_num_threads(1)
    fn(inputs[0])
    prof = cProfile.Profile()
    prof.enable()
    for x in inputs:
        fn(x)
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # tottime sum
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = []
    for (file, line, name), v in rows:
        where = f"{Path(file).name}:{name}" if file != "~" else name
        out.append((where, 100.0 * v[2] / total))
    stage_names = ("_crop", "_adjust_brightness_", "_adjust_contrast_", "_adjust_saturation_",
                   "_adjust_hue_", "_grayscale", "_gaussian_blur", "_solarize", "_normalize", "_coin")
    stages = [(name, 100.0 * v[3] / total) for (file, _, name), v in stats.stats.items()
              if file.endswith("augment.py") and name in stage_names]
    return out, sorted(stages, key=lambda kv: -kv[1])


# ---------------------------------------------------------------------------------------------


def environment() -> str:
    import streaming
    import torchvision
    import PIL

    cpu = platform.processor() or "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, load avg {load:.1f} at start; Python "
            f"{platform.python_version()}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, mosaicml-streaming {streaming.__version__}, Pillow "
            f"{PIL.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sets (< 2 min on 2 CPU cores)")
    parser.add_argument("--skip-loader", action="store_true",
                        help="only sections 2 and 3 (augmentation on one core, profile)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (both loaders)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved augmentation passes (default 5 with --quick, else 9)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    n_photos, n_fm, epochs, aug_images, aug_fm, repeats = ((96, 192, 3, 16, 64, 5) if args.quick
                                                           else (512, 2048, 5, 48, 192, 9))
    repeats = args.repeats or repeats
    lines = ["# Data pipeline benchmark", "", f"Command: `python benchmarks/data.py "
             f"{'--quick ' if args.quick else ''}{'--skip-loader ' if args.skip_loader else ''}"
             f"--workers {args.workers} --batch-size {args.batch_size} --repeats {repeats}`", "",
             f"Environment: {environment()}", "",
             f"Crops: 2 x {GLOBAL} + {N_LOCAL} x {LOCAL}, masks for patch {PATCH}; "
             f"batch {args.batch_size}; {args.workers} workers; loader medians over {epochs} epochs "
             f"(first batch of each epoch excluded).", ""]
    tmp = Path(tempfile.mkdtemp(prefix="dvtrain-bench-data-"))
    try:
        if not args.skip_loader:
            lines += ["## 1. Loader: MDS + StreamingDataset vs torchvision ImageFolder", "",
                      "| images | n | ours img/s | ImageFolder img/s | ratio |", "|---|---|---|---|---|"]
            for name, make, n in (("photos 500x375 JPEG", make_photo_folder, n_photos),
                                  ("Fashion-MNIST 28x28 PNG", make_fmnist_folder, n_fm)):
                folder, mds = tmp / f"{name[:6]}-folder", tmp / f"{name[:6]}-mds"
                make(folder, n)
                convert_to_mds(folder, mds, progress=False, workers=args.workers)
                r = bench_loaders(folder, mds, args.workers, args.batch_size, epochs)
                lines.append(f"| {name} | {r['images']} | {r['ours']:.1f} | {r['ref']:.1f} | "
                             f"{r['ours'] / r['ref']:.2f}x |")
                print(lines[-1], "  per epoch ours", [round(v, 1) for v in r["ours_all"]], "ref",
                      [round(v, 1) for v in r["ref_all"]], flush=True)
            lines.append("")

        photo_dir = tmp / "aug"
        make_photo_folder(photo_dir, aug_images, seed=1)
        jpegs = [p.read_bytes() for p in sorted(photo_dir.rglob("*.jpg"))]
        rows = bench_augment(jpegs, aug_fm, repeats)
        lines += ["## 2. Multi-crop augmentation, one core (torch.set_num_threads(1))", "",
                  f"Median of {repeats} interleaved passes (ours, reference, ours, ...; order rotated "
                  "each repeat) after a warm-up pass.", "",
                  "| images (n) | ours img/s | reference recipe img/s | ratio | ours per pass | "
                  "reference per pass |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['ours']:.1f} | {r['ref']:.1f} | "
                         f"{r['ours'] / r['ref']:.2f}x | {' '.join(f'{v:.0f}' for v in r['ours_all'])} | "
                         f"{' '.join(f'{v:.0f}' for v in r['ref_all'])} |")

        ours = MultiCropAugmentation(GLOBAL, LOCAL, N_LOCAL)
        ref = reference_recipe()
        tensors = [decode_image(b) for b in jpegs[:8]]
        pils = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs[:8]]
        lines += ["", "## 3. Where the time goes (cProfile tottime share, 8 photos, one core)", ""]
        for label, fn, inputs in (("ours", ours, tensors), ("reference recipe", ref, pils)):
            top, stages = profile(fn, inputs, 10)
            lines += [f"{label}:", "", "| function (self time) | share |", "|---|---|"]
            lines += [f"| `{w}` | {s:.1f}% |" for w, s in top]
            if stages:
                lines += ["", "| stage (incl. callees) | share |", "|---|---|"]
                lines += [f"| `{w}` | {s:.1f}% |" for w, s in stages]
            lines.append("")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
