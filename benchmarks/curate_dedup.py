"""Duplicate recall and quality rejections on a planted Fashion-MNIST pool (tests/curate_pool.py).

`python benchmarks/curate_dedup.py [--base 1000] [--per-kind 50] [--crop 0.10] [--model pixels]`

Builds the test pool at a larger size (64 px upscaled images; exact copies, lossless and JPEG
re-encodes, 0.5-2x resizes, crops of up to ``--crop`` of each side, blurred/tiny/corrupt images,
copies of test-split images), runs ``curate`` with the test's options (``--min-side 24
--min-sharpness 40 --against``) and prints recall per kind, the share of untouched images removed,
and the per-stage seconds and images/s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from curate_pool import build_pool  # noqa: E402

from dvtrain.data.curate import CurateOptions, curate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=int, default=1000)
    ap.add_argument("--per-kind", type=int, default=50)
    ap.add_argument("--crop", type=float, default=0.10)
    ap.add_argument("--model", default="pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--phash-radius", type=int, default=CurateOptions.phash_radius)
    ap.add_argument("--phash-cos", type=float, default=CurateOptions.phash_cos)
    ap.add_argument("--near-cos", type=float, default=CurateOptions.near_cos)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="curate-dedup-"))
    try:
        pool = build_pool(root, num_base=args.base, per_kind=args.per_kind, crop_fraction=args.crop)
        res = curate(root / "pool", root / "out", CurateOptions(
            min_side=24, min_sharpness=40.0, against=str(pool.against), model=args.model,
            workers=args.workers, progress=False, phash_radius=args.phash_radius,
            phash_cos=args.phash_cos, near_cos=args.near_cos))
        rem = {r["path"]: r for r in res.report["removed"]}

        def kept(x: str) -> str:
            """The image of x's duplicate group that stayed (following exact -> near chains)."""
            while x in rem and rem[x]["stage"] in ("exact", "near"):
                x = rem[x]["duplicate_of"]
            return x

        def found(c: str, o: str) -> bool:
            """Copy and original ended in one duplicate group (one kept, or a third image kept)."""
            return kept(c) == kept(o)

        print(f"pool: {res.report['counts']['source']} files ({args.base} base images, {args.per_kind} per "
              f"copy kind, crops up to {args.crop:.0%} per side), embedder {res.report['embedder']}")
        print("| planted | found |\n|---|---|")
        for kind, pairs in pool.copies.items():
            print(f"| {kind} copies | {sum(found(c, o) for c, o in pairs)} / {len(pairs)} |")
        for kind, files in pool.rejects.items():
            ok = sum(f in rem and rem[f]["stage"] == "quality" for f in files)
            print(f"| {kind} rejected by quality | {ok} / {len(files)} |")
        ok = sum(t in rem and rem[t]["stage"] == "against" for t in pool.test_copies)
        print(f"| test-split copies removed by --against | {ok} / {len(pool.test_copies)} |")
        missed = [c for pairs in pool.copies.values() for c, o in pairs if not found(c, o)]
        missed += [t for t in pool.test_copies if not (t in rem and rem[t]["stage"] == "against")]
        lost = sum(u in rem for u in pool.untouched)
        print(f"| untouched images removed | {lost} / {len(pool.untouched)} ({lost / len(pool.untouched):.1%}) |")
        print("options:", {k: res.report["options"][k] for k in ("phash_radius", "phash_cos", "near_cos")})
        print("  missed:", ", ".join(f"{m} ({rem[m]['stage'] + ': ' + rem[m]['reason'] if m in rem else 'kept'})"
                                     for m in missed))
        for u in [u for u in pool.untouched if u in rem][:5]:
            print("  untouched removed:", u, rem[u]["stage"], rem[u]["reason"], rem[u]["duplicate_of"])
        t = res.report["timings_s"]
        n = res.report["counts"]
        print("\nseconds per stage:", t, f"(quality {n['source'] / t['quality']:.0f} images/s, "
              f"embed {n['after_exact'] / max(t['embed'], 1e-9):.0f} images/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
