"""The embed stage of ``dvtrain data curate`` in one process vs two ranks (torchrun, gloo).

`python benchmarks/curate_ranks.py [--n 2000] [--image-size 56] [--rounds 2]`

Pool: the first N bundled Fashion-MNIST train images, upscaled to 64 px PNG files (a real decode
per image). Backbone: benchmarks/curate_balance.py's randomly initialised main-job ViT (192 wide,
6 blocks, patch 7, 4 registers, SwiGLU) exported as a hub file, at ``--image-size`` px. Each round
runs the CLI as a subprocess once per mode, in the same order (1 process with torch's default
threads, 1 process with one thread, 2 ranks with one thread each), into fresh output and work
directories; near-duplicate search is off (not measured here). Reported: the embed
stage's seconds from the work directory's ``embed.json`` (for 2 ranks: rank 0's wall time from
sending the slices to the barrier after them, rank 1's model load included), images/s, the
command's wall time, and the largest difference between the two modes' embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curate_balance import random_init_backbone  # noqa: E402

from dvtrain.data.fashion_mnist import load_fashion_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# mode -> (command prefix, extra environment); torchrun gives each rank OMP_NUM_THREADS=1
MODES = {"1 process, torch default threads": ([sys.executable, "-m", "dvtrain"], {}),
         "1 process, 1 thread": ([sys.executable, "-m", "dvtrain"], {"OMP_NUM_THREADS": "1"}),
         "2 ranks x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "-m", "dvtrain"], {})}


def run(mode: str, pool: Path, model: str, out: Path, image_size: int) -> tuple[float, float, np.ndarray]:
    prefix, extra_env = MODES[mode]
    cmd = prefix + ["data", "curate", str(pool), str(out), "--model", model, "--image-size",
                         str(image_size), "--min-side", "24", "--min-sharpness", "0", "--near-cos", "2",
                         "--phash-cos", "2", "--phash-radius=-1", "--no-progress"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", **extra_env)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    work = out.with_name(out.name + ".curate-work")
    embed_s = json.loads((work / "embed.json").read_text())["seconds"]
    report = json.loads((out / "curation_report.json").read_text())
    print(f"  {mode}: stages {report['timings_s']}, before write {report['seconds_before_write']} s", flush=True)
    return embed_s, wall, np.load(work / "embeddings.npy").astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"- load before: `{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}`")
    with tempfile.TemporaryDirectory(prefix="curate-ranks-") as tmp_s:
        tmp = Path(tmp_s)
        pool = tmp / "pool"
        pool.mkdir()
        images, _ = load_fashion_mnist("train", limit=args.n)
        for i, a in enumerate(images):
            Image.fromarray(a).resize((64, 64), Image.Resampling.BICUBIC).save(pool / f"{i:05d}.png")
        model = random_init_backbone(tmp)
        rows = []
        first: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            for mode in MODES:
                embed_s, wall, emb = run(mode, pool, model, tmp / f"out-{r}-{list(MODES).index(mode)}", args.image_size)
                first.setdefault(mode, emb)
                rows.append((r, mode, embed_s, len(emb) / embed_s, wall))
                print(f"round {r} {mode}: embed {embed_s:.1f} s ({len(emb) / embed_s:.0f} images/s), "
                      f"command {wall:.1f} s", flush=True)
        a = first[next(iter(MODES))]
        print(f"- load after: `{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}`")
        print(f"- embeddings: {a.shape[0]} x {a.shape[1]} fp16; largest difference to the first mode's: "
              + ", ".join(f"{m} {np.abs(a - b).max():.2e}" for m, b in first.items()) + "\n")
        print("| round | mode | embed stage (s) | images/s | whole command (s) |\n|---|---|---|---|---|")
        for r, mode, s, ips, wall in rows:
            print(f"| {r} | {mode} | {s:.1f} | {ips:.0f} | {wall:.1f} |")
        for mode in MODES:
            med = float(np.median([ips for _, m, _, ips, _ in rows if m == mode]))
            print(f"\nmedian {mode}: {med:.0f} images/s", end="")
        print()


if __name__ == "__main__":
    main()
