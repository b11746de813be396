"""Conversion to MDS shards: sources, bad files, determinism, atomic output, IDX reading."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dvtrain.data.shards import MANIFEST_NAME, convert_to_mds, load_idx, read_manifest

REPO = Path(__file__).resolve().parents[1]
FMNIST = REPO / "data" / "fashion_mnist"


def photo_paths() -> dict[str, Path]:
    """Real photographs bundled with scikit-learn (china.jpg 640x427, flower.jpg 640x427)."""
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    return {"china": images / "china.jpg", "flower": images / "flower.jpg"}


def make_photo_tree(root: Path) -> dict[str, bytes]:
    """SRC/<class>/ tree of real photos + broken files. Returns {relative path: bytes} of good ones.

    Classes: 'buildings' (china.jpg, a crop of it re-saved as JPEG), 'plants' (flower.jpg, a PNG of a
    flower crop, a nested subfolder). Broken: truncated JPEG, random bytes, zero-byte PNG. Noise: a
    .txt file (not an image: ignored), a hidden file.
    """
    photos = photo_paths()
    china, flower = photos["china"].read_bytes(), photos["flower"].read_bytes()
    good: dict[str, bytes] = {}

    def put(rel: str, data: bytes, is_good: bool = True) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if is_good:
            good[rel] = data

    buf = io.BytesIO()
    Image.open(photos["china"]).crop((100, 50, 400, 300)).save(buf, format="JPEG", quality=90)
    put("buildings/china.jpg", china)
    put("buildings/china_crop.jpeg", buf.getvalue())
    buf = io.BytesIO()
    Image.open(photos["flower"]).crop((200, 100, 360, 260)).save(buf, format="PNG")
    put("plants/flower.jpg", flower)
    put("plants/close/flower_crop.png", buf.getvalue())
    put("buildings/truncated.jpg", china[: len(china) // 2], is_good=False)
    put("plants/random.jpg", np.random.default_rng(0).bytes(4096), is_good=False)
    put("plants/empty.png", b"", is_good=False)
    put("plants/notes.txt", b"not an image", is_good=False)
    put("plants/.hidden.jpg", flower, is_good=False)
    return good


def read_mds(out: Path) -> list[dict]:
    from streaming import LocalDataset

    ds = LocalDataset(local=str(out))
    return [ds[i] for i in range(len(ds))]


def tree_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def test_folder_tree_real_photos_and_broken_files(tmp_path):
    src = tmp_path / "src"
    good = make_photo_tree(src)
    out = tmp_path / "out"
    report = convert_to_mds(src, out, progress=False)

    rows = read_mds(out)
    # sorted by relative path; labels from sorted class folders
    expected_keys = sorted(good)
    assert [r["key"] for r in rows] == expected_keys
    assert [r["label"] for r in rows] == [0, 0, 1, 1]  # buildings=0, plants=1
    for r in rows:  # bytes stored exactly as found
        assert r["image"] == good[r["key"]]

    m = read_manifest(out)
    assert m == report.manifest
    assert m["num_samples"] == 4 and m["label_names"] == ["buildings", "plants"]
    assert m["label_counts"] == {"0": 2, "1": 2}
    assert m["image_formats"] == {"JPEG": 3, "PNG": 1}
    assert m["width"]["max"] == 640 and m["width"]["min"] == 160
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"buildings/truncated.jpg", "plants/random.jpg", "plants/empty.png"}
    assert "truncated" in reasons["buildings/truncated.jpg"]
    assert "cannot identify image file" in reasons["plants/random.jpg"]
    assert reasons["plants/empty.png"].endswith("empty file (0 bytes)")
    assert m["num_skipped"] == 3 and m["source"]["kind"] == "folder"
    assert sorted(p.name for p in out.iterdir()) == ["index.json", MANIFEST_NAME, "shard.00000.mds"]


def test_truncated_jpeg_passes_verify_but_not_conversion(tmp_path):
    """PIL's verify() alone accepts a truncated JPEG; the full decode at conversion must not."""
    china = photo_paths()["china"].read_bytes()
    truncated = china[: int(len(china) * 0.7)]
    with Image.open(io.BytesIO(truncated)) as im:
        im.verify()  # does not raise: this is why conversion also calls load()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    (src / "a_truncated.jpg").write_bytes(truncated)
    (src / "b_good.jpg").write_bytes(china)
    report = convert_to_mds(tmp_path / "src", tmp_path / "out", progress=False)
    assert report.num_samples == 1
    assert [s["path"] for s in report.skipped] == ["only/a_truncated.jpg"]
    assert "image file is truncated" in report.skipped[0]["reason"]


def test_load_truncated_images_flag_is_refused(tmp_path, monkeypatch):
    make_photo_tree(tmp_path / "src")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="LOAD_TRUNCATED_IMAGES"):
        convert_to_mds(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_deterministic_bytes_and_worker_pool_keeps_order(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    convert_to_mds(src, tmp_path / "a", progress=False, size_limit=120_000)
    convert_to_mds(src, tmp_path / "b", progress=False, size_limit=120_000)
    convert_to_mds(src, tmp_path / "c", progress=False, size_limit=120_000, workers=2)
    ha, hb, hc = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b"), tree_hashes(tmp_path / "c")
    assert len([k for k in ha if k.endswith(".mds")]) >= 2  # several shards were written
    assert ha == hb == hc  # shards, index.json and manifest byte-identical


def test_max_side_resizes_and_reencodes(tmp_path):
    src = tmp_path / "src"
    good = make_photo_tree(src)
    convert_to_mds(src, tmp_path / "out", max_side=100, progress=False)
    rows = {r["key"]: r for r in read_mds(tmp_path / "out")}
    china = Image.open(io.BytesIO(rows["buildings/china.jpg"]["image"]))
    assert china.format == "JPEG" and china.size == (100, 67)  # 640x427 * 100/640, rounded
    crop = Image.open(io.BytesIO(rows["plants/close/flower_crop.png"]["image"]))
    assert crop.format == "PNG" and crop.size == (100, 100)
    m = read_manifest(tmp_path / "out")
    assert m["num_resized"] == 4 and m["width"]["max"] == 100
    # re-encoding is close to a Lanczos resize of the original
    ref = np.asarray(Image.open(io.BytesIO(good["buildings/china.jpg"])).convert("RGB").resize(
        (100, 67), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(np.asarray(china.convert("RGB"), dtype=np.float32) - ref).mean() < 3.0


def test_interrupted_conversion_leaves_nothing_complete(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    out = tmp_path / "out"

    def interrupt(count: int) -> None:
        if count == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_to_mds(src, out, progress=False, on_result=interrupt)
    assert list(tmp_path.iterdir()) == [src]  # no OUT, no OUT.tmp-<pid>

    # an existing output is refused, then replaced only on success with --overwrite
    convert_to_mds(src, out, progress=False, limit=2)
    with pytest.raises(ValueError, match="already exists"):
        convert_to_mds(src, out, progress=False)
    with pytest.raises(KeyboardInterrupt):
        convert_to_mds(src, out, progress=False, overwrite=True, on_result=interrupt)
    assert read_manifest(out)["num_samples"] == 2  # the old complete output is untouched
    convert_to_mds(src, out, progress=False, overwrite=True)
    assert read_manifest(out)["num_samples"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_path_list_with_labels_and_missing_file(tmp_path):
    photos = photo_paths()
    listing = tmp_path / "list.txt"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "f.jpg").write_bytes(photos["flower"].read_bytes())
    listing.write_text(
        "# path label\n"
        f"{photos['china']}\t3\n"
        "imgs/f.jpg 7\n"
        "imgs/missing.jpg,1\n"
        "\n"
    )
    report = convert_to_mds(listing, tmp_path / "out", label_names=[f"c{i}" for i in range(8)],
                            progress=False)
    rows = read_mds(tmp_path / "out")
    assert [(r["key"], r["label"]) for r in rows] == [(str(photos["china"]), 3), ("imgs/f.jpg", 7)]
    assert report.skipped == [{"path": "imgs/missing.jpg", "reason": "file not found"}]
    assert report.manifest["label_counts"]["3"] == 1 and report.manifest["label_counts"]["0"] == 0
    assert report.manifest["label_names"][7] == "c7"


def test_load_idx_gz_and_raw_and_errors(tmp_path):
    images = load_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = load_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # Fashion-MNIST test set order
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(load_idx(raw), labels)

    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        load_idx(bad)
    bad.write_bytes(raw.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_idx(bad)


def test_idx_source_lossless_png_with_sibling_labels(tmp_path):
    src = FMNIST / "train-images-idx3-ubyte.gz"
    report = convert_to_mds(src, tmp_path / "out", limit=64, workers=2, progress=False,
                            label_names=(FMNIST / "classes.txt").read_text().split("\n")[:10])
    images = load_idx(src)[:64]
    labels = load_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:64]
    rows = read_mds(tmp_path / "out")
    assert [r["key"] for r in rows] == [f"train-images-idx3-ubyte.gz[{i}]" for i in range(64)]
    assert [r["label"] for r in rows] == labels.tolist()
    for r, a in zip(rows, images):
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "PNG" and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), a)  # lossless
    m = report.manifest
    assert m["source"]["labels_file"].endswith("train-labels-idx1-ubyte.gz")
    assert m["label_names"][9] == "Ankle boot" and m["num_labels"] == 10
    assert sum(m["label_counts"].values()) == 64


def test_npz_and_npy_sources(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=rgb, labels=np.arange(5))
    convert_to_mds(tmp_path / "d.npz", tmp_path / "o1", progress=False)
    rows = read_mds(tmp_path / "o1")
    assert [r["label"] for r in rows] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows[3]["image"]))), rgb[3])

    np.save(tmp_path / "x.npy", rgb[..., 0])
    np.save(tmp_path / "y.npy", np.array([4, 3, 2, 1, 0]))
    convert_to_mds(tmp_path / "x.npy", tmp_path / "o2", labels_file=tmp_path / "y.npy",
                   progress=False)
    assert [r["label"] for r in read_mds(tmp_path / "o2")] == [4, 3, 2, 1, 0]
    convert_to_mds(tmp_path / "x.npy", tmp_path / "o3", progress=False)  # no labels -> -1
    assert read_manifest(tmp_path / "o3")["label_counts"] == {"-1": 5}

    np.save(tmp_path / "f.npy", rgb.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        convert_to_mds(tmp_path / "f.npy", tmp_path / "o4", progress=False)


def test_user_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        convert_to_mds(tmp_path / "nope", tmp_path / "out", progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(photo_paths()["china"].read_bytes())
    with pytest.raises(ValueError, match="no class subfolders"):
        convert_to_mds(flat, tmp_path / "out", labels="from-folders", progress=False)
    r = convert_to_mds(flat, tmp_path / "out", progress=False)  # auto -> unlabelled
    assert r.manifest["label_counts"] == {"-1": 1} and r.manifest["label_names"] is None
    with pytest.raises(ValueError, match="labels='x'"):
        convert_to_mds(flat, tmp_path / "o2", labels="x", progress=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "z.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 images decoded"):
        convert_to_mds(tmp_path / "broken", tmp_path / "o3", progress=False)
    assert not (tmp_path / "o3").exists()


def test_manifest_is_json_and_has_no_timestamps(tmp_path):
    make_photo_tree(tmp_path / "src")
    convert_to_mds(tmp_path / "src", tmp_path / "out", progress=False)
    text = (tmp_path / "out" / MANIFEST_NAME).read_text()
    m = json.loads(text)
    assert set(m) >= {"num_samples", "label_names", "label_counts", "skipped", "source"}
    assert "time" not in text and "date" not in text


class _CtrlCWhileWorkersStart(list):
    """Items whose first chunk, taken while map_in_workers starts its workers, sends this process
    a SIGINT, as a Ctrl-C at that moment would."""

    def __getitem__(self, k):
        if isinstance(k, slice) and k.start == 0:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(k)


def test_map_in_workers_keeps_order_and_does_not_lose_a_ctrl_c_while_workers_start():
    from dvtrain.data.curate.quality import _scan_chunk
    from dvtrain.data.shards import map_in_workers

    rng = np.random.default_rng(0)
    payloads = [("array", rng.integers(0, 256, (8 + i % 5, 9), dtype=np.uint8)) for i in range(40)]
    one = [r["width"] * 100 + r["height"] for r in map_in_workers(_scan_chunk, payloads, 1, chunk_size=7)]
    two = [r["width"] * 100 + r["height"] for r in map_in_workers(_scan_chunk, payloads, 2, chunk_size=7)]
    assert one == two == [9 * 100 + 8 + i % 5 for i in range(40)]
    # the SIGINT arrives while SIGINT is held back for starting the workers: it must not be lost
    # (Python's own handler installed for the test: where pytest runs as a background job of a
    # non-interactive shell, SIGINT starts ignored)
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in map_in_workers(_scan_chunk, _CtrlCWhileWorkersStart(payloads), 2, chunk_size=7):
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
