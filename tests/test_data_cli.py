"""`dvtrain data convert` / `dvtrain data inspect` through Typer's runner (real photos + Fashion-MNIST)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from dvtrain.data.commands import app

REPO = Path(__file__).resolve().parents[1]
FMNIST = REPO / "data" / "fashion_mnist"
runner = CliRunner()


def photo_folder(root: Path) -> None:
    """Two classes of real photos (scikit-learn's china.jpg / flower.jpg and crops) + a broken file."""
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    for cls, name in (("city", "china.jpg"), ("nature", "flower.jpg")):
        (root / cls).mkdir(parents=True)
        (root / cls / name).write_bytes((images / name).read_bytes())
        photo = Image.open(images / name)
        for k in range(2):
            photo.crop((150 * k, 0, 150 * k + 320, 320)).save(root / cls / f"crop{k}.jpg")
    data = (images / "china.jpg").read_bytes()
    (root / "city" / "broken.jpg").write_bytes(data[: len(data) // 3])
    # what a real dump holds beside its images: counted by extension, never read; hidden files not counted
    (root / "city" / "captions.txt").write_text("a city\n")
    (root / "nature" / "meta.json").write_text("{}")
    (root / "nature" / "meta2.JSON").write_text("{}")
    (root / "README").write_text("photos\n")
    (root / "nature" / ".DS_Store").write_bytes(b"\0")


def test_convert_and_inspect_photo_folder(tmp_path):
    photo_folder(tmp_path / "src")
    out = tmp_path / "mds"
    res = runner.invoke(app, ["convert", str(tmp_path / "src"), str(out), "--max-side", "256",
                              "--workers", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote 6 samples" in res.output
    assert "skipped 1 file(s)" in res.output and "city/broken.jpg" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label_names"] == ["city", "nature"] and manifest["num_resized"] == 6
    assert manifest["other_files"] == {"(none)": 1, ".json": 2, ".txt": 1}
    assert "ignored 4 file(s) that are not images by their extension: (none) 1, .json 2, .txt 1" \
        in " ".join(res.output.split())

    png = tmp_path / "sheet.png"
    res = runner.invoke(app, ["inspect", str(out), "--png", str(png), "--samples", "6",
                              "--augmented", "2", "--local-crops", "4"])
    assert res.exit_code == 0, res.output
    assert "6 samples in 1 shard(s), 1 skipped" in res.output
    assert "city" in res.output and "50.0%" in res.output
    assert "max 256" in res.output
    sheet = Image.open(png)
    assert sheet.format == "PNG"
    # 6 tiles of 128 px in one row; two augmented rows of original + 2 global + 4 local
    assert sheet.size == (7 * 128, (128 + 14) + 14 + 2 * (128 + 14))
    pixels = np.asarray(sheet.convert("RGB"), dtype=np.float32)
    assert pixels[:128, :128].std() > 20  # a real photo tile, not blank


def test_convert_fashion_mnist_idx_with_label_names(tmp_path):
    out = tmp_path / "fm"
    res = runner.invoke(app, ["convert", str(FMNIST / "t10k-images-idx3-ubyte.gz"), str(out),
                              "--label-names", str(FMNIST / "classes.txt"), "--limit", "200",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(out), "--scan"])
    assert res.exit_code == 0, res.output
    assert "200 samples" in res.output and "Ankle boot" in res.output
    assert "min 28  median 28.0  mean 28.0  max 28" in res.output
    from streaming import LocalDataset

    first = LocalDataset(local=str(out))[0]
    assert first["label"] == 9 and Image.open(io.BytesIO(first["image"])).size == (28, 28)


def test_user_errors_exit_2_with_message(tmp_path):
    res = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "o")])
    assert res.exit_code == 1 and "does not exist" in res.output
    (tmp_path / "no_images" / "sub").mkdir(parents=True)  # a dump of formats we do not read
    for name in ("a.txt", "sub/b.heic", "sub/c.heic"):
        (tmp_path / "no_images" / name).write_text("x")
    for cmd in ("convert", "curate"):
        res = runner.invoke(app, [cmd, str(tmp_path / "no_images"), str(tmp_path / "o_none")])
        assert res.exit_code == 1 and "found no images; it holds 3 file(s) that are not images by their " \
            "extension: .heic 2, .txt 1 (images: .jpg," in " ".join(res.output.split()), res.output
        assert not (tmp_path / "o_none").exists()
    res = runner.invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 1 and "no index.json" in res.output
    photo_folder(tmp_path / "src")
    assert runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "o"),
                               "--no-progress"]).exit_code == 0
    res = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "o"),
                              "--no-progress"])
    assert res.exit_code == 1 and "--overwrite" in res.output
