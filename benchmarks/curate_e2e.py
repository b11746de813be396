"""`dvtrain data curate` end to end on N small images: seconds and images/s per stage.

`python benchmarks/curate_e2e.py [--n 100000] [--workers 2] [--target-size N/2] [--keep DIR]`

Pool: N PNG files of 64 x 64 px made from the bundled Fashion-MNIST images (the 30,000 train and
test images upscaled, then their horizontal flip, vertical flip, 90 and 270 degree rotations until
N; these transforms are not duplicates by curation's rules), written to a temporary folder (not
timed). Then the CLI's code path (``curate``) with ``--model pixels``, ``--min-side 24
--min-sharpness 40`` (as the tests, for upscaled Fashion-MNIST), ``--target-size`` and
``--workers``; prints the per-stage seconds from ``curation_report.json`` and images/s over the
images each stage handled.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvtrain.data.curate import CurateOptions, curate  # noqa: E402
from dvtrain.data.fashion_mnist import load_fashion_mnist  # noqa: E402

TRANSFORMS = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
              Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)


def write_pool(folder: Path, n: int) -> None:
    base = np.concatenate([load_fashion_mnist("train")[0], load_fashion_mnist("test")[0]])
    if n > len(base) * len(TRANSFORMS):
        raise SystemExit(f"--n at most {len(base) * len(TRANSFORMS)}")
    folder.mkdir(parents=True)
    for i in range(n):
        t, j = divmod(i, len(base))
        im = Image.fromarray(base[j]).resize((64, 64), Image.Resampling.BICUBIC)
        if TRANSFORMS[t] is not None:
            im = im.transpose(TRANSFORMS[t])
        im.save(folder / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--target-size", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write the pool and OUT here (kept)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="curate-e2e-"))
    try:
        t0 = time.time()
        if not (root / "pool").is_dir():
            write_pool(root / "pool", args.n)
        print(f"pool: {args.n} PNG files, 64 x 64 px, written in {time.time() - t0:.0f} s (not timed)")
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        t0 = time.time()
        res = curate(root / "pool", root / "out", CurateOptions(
            min_side=24, min_sharpness=40.0, model="pixels", workers=args.workers, progress=False,
            target_size=args.target_size or args.n // 2, overwrite=True))
        total = time.time() - t0
        c, t = res.report["counts"], res.report["timings_s"]
        handled = {"quality": c["source"], "exact": c["after_quality"], "embed": c["after_exact"],
                   "near": c["after_exact"], "cluster": c["after_near"], "write": c["selected"]}
        print(f"- host: {platform.machine()}, {os.cpu_count()} cores; load before: `{uptime}`")
        print(f"- counts: {c}")
        print("\n| stage | images | seconds | images/s |\n|---|---|---|---|")
        for stage, secs in t.items():
            n = handled.get(stage)
            rate = f"{n / secs:,.0f}" if n and secs > 0 else "-"
            print(f"| {stage} | {n if n is not None else '-'} | {secs:.1f} | {rate} |")
        print(f"| **total** (`curate()` call) | {c['source']} | {total:.1f} | {c['source'] / total:,.0f} |")
        print(f"- load after: `{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}`")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
