"""`dvtrain data curate` on pools built from the bundled Fashion-MNIST images with planted problems
(tests/curate_pool.py): duplicate recall, quality rejections with reasons, `--against`, balanced
sampling of a 10:1 class imbalance, retrieval from a one-class seed set, bad input, resume, and the
CLI as a subprocess writing MDS shards that the training loader and `dvtrain launch` read.

Fashion-MNIST images are 28 x 28; the planted pool upscales them to 64 px, so these tests pass
`--min-side 24` (0.5x copies are 32 px, the tiny plants 16 px) and `--min-sharpness 40` (the
upscaled images are soft: untouched ones measure >= 100, the radius-3 blurred plants <= 20,
2x upscaled copies >= 37)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from curate_pool import build_pool, upscale
from dvtrain.data.commands import app
from dvtrain.data.curate import CurateOptions, curate
from dvtrain.data.curate import cluster as cl
from dvtrain.data.curate.dedup import connected_groups, hamming_pairs
from dvtrain.data.fashion_mnist import load_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
POOL_OPTS = dict(min_side=24, min_sharpness=40.0, progress=False)
runner = CliRunner()


def _mds(out: Path) -> list[dict]:
    from streaming import LocalDataset

    ds = LocalDataset(local=str(out))
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    pool = build_pool(root)
    res = curate(root / "pool", root / "out", CurateOptions(against=str(pool.against), **POOL_OPTS))
    removed = {r["path"]: r for r in res.report["removed"]}
    return pool, res, removed


def _kept(removed: dict, x: str) -> str:
    """The image of x's duplicate group that stayed (following exact -> near chains)."""
    while x in removed and removed[x]["stage"] in ("exact", "near"):
        x = removed[x]["duplicate_of"]
    return x


def _found(removed: dict, copy: str, original: str) -> bool:
    """A planted pair is found when both ended in one duplicate group: one of the two kept and the
    other removed as its duplicate, or both removed as duplicates of the same kept image."""
    return _kept(removed, copy) == _kept(removed, original)


@pytest.mark.parametrize("kind", ["exact", "lossless", "jpeg", "resized"])
def test_planted_copies_are_found(planted, kind):
    pool, _, removed = planted
    pairs = pool.copies[kind]
    found = [_found(removed, c, o) for c, o in pairs]
    assert sum(found) == len(pairs), [p for p, f in zip(pairs, found) if not f]
    for c, o in pairs:
        r = removed.get(c) or removed[o]
        assert r["stage"] == ("exact" if kind in ("exact", "lossless") else "near")
    if kind == "exact":
        assert all(removed[c]["reason"] == "identical file bytes" for c, _ in pairs)
    if kind == "lossless":
        assert all(removed[c]["reason"] == "identical decoded pixels" for c, _ in pairs)
    if kind == "jpeg":  # same size: the lossless original stays, though JPEG blocks measure sharper
        assert [_kept(removed, c) for c, _ in pairs] == [o for _, o in pairs]


def test_keep_order_by_hand():
    """Largest first; at equal size a lossless file before a JPEG, then the sharpest, then the first."""
    from dvtrain.data.curate.dedup import keep_order

    area = np.array([100, 400, 400, 400, 400])
    sharp = np.array([90.0, 10.0, 50.0, 80.0, 50.0])
    lossy = np.array([False, False, False, True, False])
    assert keep_order(area, sharp, lossy).tolist() == [4, 2, 0, 3, 1]
    assert keep_order(area, sharp).tolist() == [4, 3, 1, 0, 2]  # no format known: the JPEG wins on sharpness


def test_cropped_copies_are_found(planted):
    pool, _, removed = planted
    found = [_found(removed, c, o) for c, o in pool.copies["cropped"]]
    assert sum(found) >= 0.9 * len(found), [p for p, f in zip(pool.copies["cropped"], found) if not f]
    reasons = [removed[x]["reason"] for c, o in pool.copies["cropped"] for x in (c, o) if x in removed]
    assert sum("normalised cross-correlation" in r for r in reasons) >= len(found) // 2, reasons


def test_crop_ncc_and_candidates_on_hand_made_crops():
    """An exact crop scores 1.0 at the right box size; another garment of the same class scores
    lower; the candidate search pairs each crop with its original and never an image with itself."""
    from dvtrain.data.curate import crops

    images, labels = load_fashion_mnist("train", limit=60)
    full = [upscale(a) for a in images]
    # (left, top, right, bottom), <= 10 % a side; the last two cut one side only
    cut = [(5, 0, 64, 58), (0, 3, 60, 64), (2, 2, 61, 62), (0, 0, 58, 64), (0, 6, 64, 64)]
    copies = [full[i].crop(box) for i, box in enumerate(cut)]
    for i, c in enumerate(copies):
        best = max(crops.crop_ncc(c, full[i], b) for b in crops.BOXES)
        assert best > 0.9999
        other = next(j for j in range(len(cut), 60) if labels[j] == labels[i])
        assert max(crops.crop_ncc(c, full[other], b) for b in crops.BOXES) < 0.99
    assert crops.crop_ncc(copies[0], Image.new("L", (64, 20)), crops.BOXES[0]) == -1.0  # no box fits
    n = len(full) + len(copies)
    planted = {(i, len(full) + i) for i in range(len(cut))}  # (original, copy)
    desc = np.stack([crops.crop_descriptors(im) for im in full + copies])
    assert desc.shape == (n, len(crops.BOXES), crops.THUMB_SIDE ** 2) and desc.dtype == np.float16
    cand = crops.crop_candidates((desc, np.arange(n)), None, min_cos=0.93)
    assert (cand[:, 0] != cand[:, 1]).all()
    assert planted <= {(o, c) for o, c, _ in cand.tolist()}
    arrays = [np.asarray(im) for im in full + copies]
    for workers in (1, 2):  # verification in this process and in 2 worker processes: same result
        found, score = crops.cropped_copies((desc, np.arange(n), lambda r: ("array", arrays[r])), None,
                                            min_cos=0.93, ncc=0.995, workers=workers)
        assert planted <= {tuple(p) for p in found.tolist()} and (score >= 0.995).all()
        if workers == 1:
            first = (found, score)
        else:
            assert np.array_equal(found, first[0]) and np.array_equal(score, first[1])


def test_untouched_images_stay_and_rejects_have_reasons(planted):
    pool, res, removed = planted
    lost = [u for u in pool.untouched if u in removed]
    assert len(lost) <= 0.01 * len(pool.untouched), [removed[u] for u in lost]
    for f in pool.rejects["tiny"]:
        assert removed[f]["stage"] == "quality" and removed[f]["reason"].startswith("too small: 16x16 px")
    for f in pool.rejects["blurred"]:
        assert removed[f]["stage"] == "quality" and removed[f]["reason"].startswith("blurred: variance of the Laplacian")
    for f in pool.rejects["corrupt"]:
        assert removed[f]["stage"] == "quality" and removed[f]["reason"].startswith("does not decode: ")
    for f in pool.test_copies:
        assert removed[f]["stage"] == "against" and removed[f]["duplicate_of"].startswith(str(pool.against))
    # counts add up: source = selected + removed
    c = res.report["counts"]
    assert c["source"] == c["selected"] + len(removed) == len(list((pool.root / "pool").iterdir()))
    written = {s["key"] for s in _mds(Path(res.out))}
    assert written.isdisjoint(removed) and len(written) == c["selected"]


def test_hamming_range_search_matches_brute_force():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(300, 8), dtype=np.uint8)
    codes[150:] = codes[:150] ^ (rng.random((150, 64)) < 0.03).reshape(150, 8, 8).dot(1 << np.arange(8)[::-1]).astype(np.uint8)
    bits = np.unpackbits(codes, axis=1)
    dist = (bits[:, None] != bits[None]).sum(-1)
    for radius in (0, 2, 5):
        expect = {(i, j) for i, j in zip(*np.nonzero(dist <= radius)) if i < j}
        assert {tuple(p) for p in hamming_pairs(codes, radius).tolist()} == expect
    assert connected_groups(5, np.array([[0, 3], [3, 4]])).tolist() == [0, 1, 2, 0, 0]


def test_water_fill_and_balanced_sampling_by_hand():
    rng = np.random.default_rng(0)
    assert cl.water_fill(np.array([2, 10, 10]), 12, rng).tolist() == [2, 5, 5]
    assert cl.water_fill(np.array([1, 1, 9]), 11, rng).tolist() == [1, 1, 9]
    # two leaf clusters under one top cluster and one under another: the top budget halves
    leaf = np.array([0] * 50 + [1] * 50 + [2] * 10)
    chosen = cl.balanced_sample([leaf, np.array([0, 0, 1])], 20, seed=0)
    assert len(chosen) == 20 and len(set(chosen.tolist())) == 20
    assert np.bincount(leaf[chosen], minlength=3).tolist() == [5, 5, 10]


def _imbalanced(root: Path, counts: dict[int, int]) -> Path:
    images, labels = load_fashion_mnist("train")
    idx = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in counts.items()])
    path = root / "imbalanced.npz"
    np.savez(path, images=images[idx], labels=labels[idx])
    return path


def test_balanced_sampling_evens_out_a_10_to_1_imbalance_of_separated_modes():
    """What hierarchical k-means + balanced sampling guarantees when the embedding separates the
    classes (as a trained backbone's does): five classes, 10:1 from largest to smallest, each a
    mixture of three sub-modes, labels never shown to the algorithm."""
    rng = np.random.default_rng(0)
    sizes = [600, 300, 150, 100, 60]
    centers = rng.normal(size=(5, 32)) * 4.0
    x, y = [], []
    for c, n in enumerate(sizes):
        subs = centers[c] + rng.normal(size=(3, 32)) * 1.0
        x.append(subs[rng.integers(0, 3, n)] + rng.normal(size=(n, 32)) * 0.3)
        y += [c] * n
    x_ND = np.concatenate(x).astype(np.float16)
    y = np.asarray(y)
    levels = cl.hierarchical_kmeans(x_ND, cl.auto_cluster_counts(len(x_ND)), resampling_steps=3, seed=0)
    chosen = cl.balanced_sample(levels, 240, seed=0)  # 6 top clusters x 40
    per_class = np.bincount(y[chosen], minlength=5)
    random_pick = np.bincount(y[rng.choice(len(y), 240, replace=False)], minlength=5)
    print(f"balanced {per_class.tolist()}, uniform random {random_pick.tolist()}")
    # 5 classes, 6 top-level clusters: one class spans two of them, so 2:1 is the expected worst
    assert len(chosen) == 240 and per_class.max() / per_class.min() <= 2.0
    assert random_pick.max() / random_pick.min() > 5.0


def test_balanced_sampling_end_to_end_with_raw_pixels(tmp_path):
    """The same through `curate` on real images with the raw-pixel embedding: the sample is
    spread over the clusters (the largest leaf cluster's share shrinks); the class ratio is
    printed, not asserted: raw pixels do not separate Fashion-MNIST classes (README)."""
    counts = {0: 600, 1: 300, 7: 150, 8: 100, 9: 60}  # largest / smallest = 10
    src = _imbalanced(tmp_path, counts)
    res = curate(src, tmp_path / "out", CurateOptions(target_size=200, min_side=24, min_sharpness=0,
                                                       progress=False))
    labels = np.array([s["label"] for s in _mds(tmp_path / "out")])
    per_class = np.bincount(labels, minlength=10)[list(counts)]
    print(f"raw-pixel embeddings: per class {per_class.tolist()}, ratio {per_class.max() / per_class.min():.2f}")
    before = np.asarray(res.report["clusters"]["leaf_sizes_before"])
    after = np.asarray(res.report["clusters"]["leaf_sizes_after"])
    assert len(labels) == 200 and after.sum() == 200 and np.all(after <= before)
    assert after.max() / 200 < before.max() / before.sum()
    assert res.report["clusters"]["counts_per_level"] == cl.auto_cluster_counts(res.report["counts"]["after_near"])


@pytest.mark.parametrize("seed_class", [1, 8])  # Trouser, Bag
def test_retrieval_from_a_one_class_seed_set(tmp_path, seed_class):
    counts = {c: 150 for c in range(10)}
    src = _imbalanced(tmp_path, counts)
    test_images, test_labels = load_fashion_mnist("test")
    seeds = tmp_path / "seeds.npz"
    np.savez(seeds, images=test_images[test_labels == seed_class][:25])
    curate(src, tmp_path / "out", CurateOptions(seed_set=str(seeds), retrieve_k=4, min_side=24,
                                                 min_sharpness=0, progress=False))
    labels = np.array([s["label"] for s in _mds(tmp_path / "out")])
    share = float((labels == seed_class).mean())
    print(f"seed class {seed_class}: {len(labels)} retrieved, {share:.1%} of that class")
    assert len(labels) >= 25 and share >= 0.9


def test_backbone_embeddings_from_an_export(tmp_path):
    from dvtrain.checkpoint.backbone import LoadedBackbone, backbone_kwargs
    from dvtrain.export import export_hub
    from dvtrain.models.vit import DinoVisionTransformer

    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=3).eval()
    export_hub(LoadedBackbone(m, backbone_kwargs(m), "test"), tmp_path / "vit.pth")
    src = _imbalanced(tmp_path, {0: 40, 1: 40})
    res = curate(src, tmp_path / "out", CurateOptions(model=str(tmp_path / "vit.pth"), image_size=28,
                                                       target_size=30, min_side=24, min_sharpness=0,
                                                       near_cos=None, phash_cos=None, progress=False))
    assert res.report["embedder"].startswith("dvtrain-hub backbone")
    emb = np.load(Path(res.report["work_dir"]) / "embeddings.npy", mmap_mode="r")
    assert emb.dtype == np.float16 and emb.shape[1] == 48
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert res.report["counts"]["selected"] == 30


def test_folder_with_top_level_images_and_subfolders_is_curated_whole(tmp_path, capsys):
    """A raw dump with images beside subfolders: every image is curated (without labels), with a
    warning; a folder whose images are all in subfolders keeps the subfolder names as labels."""
    images, _ = load_fashion_mnist("train", limit=8)
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    for i, a in enumerate(images):
        upscale(a).save(mixed / ("sub" if i >= 5 else ".") / f"im{i}.png")
    (mixed / "sub" / "im5.json").write_text("{}")  # a sidecar: counted, not read
    opts = dict(POOL_OPTS, phash_radius=-1, near_cos=None, crop_ncc=None)
    res = curate(mixed, tmp_path / "o1", CurateOptions(**opts))
    assert res.report["counts"]["source"] == res.report["counts"]["selected"] == 8
    assert res.report["other_files"] == {".json": 1}
    assert {s["label"] for s in _mds(tmp_path / "o1")} == {-1}
    err = capsys.readouterr().err
    assert "has 5 image(s) at its top level" in err and "all 8 images are curated" in err
    tidy = tmp_path / "tidy"
    for i, a in enumerate(images):
        (tidy / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        upscale(a).save(tidy / f"class{i % 2}" / f"im{i}.png")
    res = curate(tidy, tmp_path / "o2", CurateOptions(**opts))
    assert res.report["counts"]["selected"] == 8
    assert sorted(s["label"] for s in _mds(tmp_path / "o2")) == [0] * 4 + [1] * 4
    assert "top level" not in capsys.readouterr().err


def test_bad_input_messages_and_resume(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    images, _ = load_fashion_mnist("train", limit=12)
    from PIL import Image

    for i, a in enumerate(images):
        Image.fromarray(a).resize((64, 64)).save(pool / f"{i}.png")
    (pool / "dangling.png").symlink_to(tmp_path / "missing.png")  # listed, cannot be read

    def cli(*args):
        return runner.invoke(app, ["curate", *map(str, args), "--no-progress", "--min-side", "24",
                                   "--min-sharpness", "0"])

    r = cli(tmp_path / "nope", tmp_path / "o1")
    assert r.exit_code == 1 and "source" in r.output and "does not exist" in r.output
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    r = cli(pool, tmp_path / "o1", "--model", tmp_path / "bad.pth")
    assert r.exit_code == 1 and "--model" in r.output and "cannot be loaded" in r.output
    assert not (tmp_path / "o1.curate-work").exists()  # failed before any work
    r = cli(pool, tmp_path / "o1", "--target-size", 1000)
    assert r.exit_code == 1 and "--target-size 1000 is larger than the 12 images left" in r.output
    assert "Traceback" not in r.output
    state = json.loads((tmp_path / "o1.curate-work" / "state.json").read_text())
    assert set(state["stages"]) == {"quality", "exact", "embed", "near"}
    r = cli(pool, tmp_path / "o1", "--target-size", 6)
    assert r.exit_code == 0, r.output
    assert "resumed: quality, exact, embed, near" in r.output and "wrote 6 samples" in r.output
    report = json.loads((tmp_path / "o1" / "curation_report.json").read_text())
    assert {"path": "dangling.png", "stage": "quality", "duplicate_of": None}.items() <= \
        [x for x in report["removed"] if x["path"] == "dangling.png"][0].items()
    assert "No such file" in [x for x in report["removed"] if x["path"] == "dangling.png"][0]["reason"]
    r = cli(pool, tmp_path / "o2", "--min-std", 1000)
    assert r.exit_code == 1 and "no image of" in r.output and "near-constant" in r.output
    r = cli(pool, tmp_path / "o1", "--target-size", 6)
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        r = cli(locked, tmp_path / "o3")
        assert r.exit_code == 1 and "not readable" in r.output


@pytest.mark.slow  # ~15 s on a quiet machine, most of it importing mosaicml-streaming
def test_cli_subprocess_writes_mds_the_trainer_reads(planted, tmp_path):
    pool, _, _ = planted
    out = tmp_path / "curated"
    cmd = [sys.executable, "-m", "dvtrain", "data", "curate", str(pool.root / "pool"), str(out),
           "--against", str(pool.against), "--target-size", "150", "--min-side", "24",
           "--min-sharpness", "40", "--workers", "2", "--no-progress"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote 150 samples" in res.stdout
    report = json.loads((out / "curation_report.json").read_text())
    assert report["counts"]["selected"] == 150 and sum(report["clusters"]["leaf_sizes_after"]) == 150
    assert (out / "curation_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 150 and manifest["columns"] == {"image": "bytes", "label": "int", "key": "str"}
    # the training loader's decode path reads every sample
    from dvtrain.data.loader import decode_image

    samples = _mds(out)
    assert len(samples) == 150 and all(decode_image(s["image"]).shape[0] == 3 for s in samples[:20])


@pytest.mark.slow  # two CLI subprocesses, ~25 s
def test_ctrl_c_stops_with_130_and_the_relaunch_resumes(planted, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while stage `near` runs
    with 2 decoding workers: one line naming the stage and the work directory, exit 130, no
    traceback from the command or its workers; the same command again resumes after `embed`."""
    import signal
    import time

    pool, _, _ = planted
    out = tmp_path / "curated"
    cmd = [sys.executable, "-m", "dvtrain", "data", "curate", str(pool.root / "pool"), str(out),
           "--against", str(pool.against), "--min-side", "24", "--min-sharpness", "40",
           "--workers", "2", "--no-progress"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    # as from a terminal: SIGINT at its default even when this test runs where it is ignored (a
    # background job of a non-interactive shell, e.g. `make test &`, starts with SIGINT ignored)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "stage near":  # printed just before the stage starts its work
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.1)  # an impatient second Ctrl-C must not hang the shutdown of the workers
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            break
    lines += proc.stdout.readlines()
    text = "".join(lines)
    assert proc.wait(timeout=120) == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert (f"stopped (Ctrl-C) in stage near; the stages that finished are kept in "
            f"{out}.curate-work") in text.replace("\n", ""), text
    assert not out.exists()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed: quality, exact, embed" in res.stdout
    lines = res.stdout.splitlines()
    assert "stage quality: finished in an earlier run, resumed" in lines and "stage quality" not in lines
    assert "stage near" in lines  # the interrupted stage runs again
    assert (out / "curation_report.json").is_file()


@pytest.mark.slow
def test_launch_trains_on_curated_output(planted, tmp_path):
    from test_launch import launch_cmd, run, tiny_overrides

    _, res, _ = planted
    out = Path(res.out)
    run_dir = tmp_path / "run"
    # the planted pool is unlabelled (no class folders), so no k-NN evaluation
    r = run(launch_cmd(run_dir, tiny_overrides(out.parent, f"data.path={out}", "eval.train_path=null",
                                               "eval.val_path=null")))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["iterations"] == 6 and summary["images_seen"] == 48


def test_sharpness_and_quality_reasons_by_hand():
    from dvtrain.data.curate.quality import QualityThresholds, quality_reason, sharpness

    checker = (np.indices((10, 10)).sum(0) % 2) * 255.0
    # every interior Laplacian is +-4 * 255 with mean 0, so the variance is (4 * 255)^2
    assert sharpness(checker) == pytest.approx((4 * 255.0) ** 2)
    assert sharpness(np.full((10, 10), 7.0)) == 0.0 and sharpness(np.zeros((2, 9))) == 0.0
    t = QualityThresholds(min_side=32, max_aspect=3.0, min_sharpness=10.0, min_std=2.0)
    ok = {"ok": True, "width": 64, "height": 48, "sharpness": 50.0, "std": 30.0}
    assert quality_reason(ok, t) is None
    assert quality_reason(dict(ok, height=20), t).startswith("too small: 64x20 px")
    assert quality_reason(dict(ok, width=200, height=40), t).startswith("extreme aspect ratio 5.00")
    assert quality_reason(dict(ok, std=1.0), t).startswith("near-constant")
    assert quality_reason(dict(ok, sharpness=3.0), t).startswith("blurred")
    assert quality_reason({"ok": False, "reason": "does not decode: x"}, t) == "does not decode: x"
