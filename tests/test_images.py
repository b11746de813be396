"""16-bit images and EXIF orientation through the one decode (dvtrain/data/images.py): conversion to MDS,
the manifest and CLI report, the training loader's read-time decode and the eval/viz image opener.

Every file is made here: 16-bit grey PNG and TIFF written by PIL, a 16-bit RGB PNG written byte by byte
(PIL cannot write 48-bit PNG), a JPEG carrying EXIF orientation 6.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dvtrain.data.commands import app as data_app
from dvtrain.data.images import decode_image, open_rgb
from dvtrain.data.shards import convert_to_mds

runner = CliRunner()

# 16-bit values with their 8-bit results under x >> 8, computed by hand: 256 * k .. 256 * k + 255 -> k
GREY16 = np.array([[0, 255, 256, 257], [32767, 32768, 65280, 65535]], dtype=np.uint16)
GREY8 = np.array([[0, 0, 1, 1], [127, 128, 255, 255]], dtype=np.uint8)
RAMP16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0, 257, ..., 65535


def png_16bit(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3] uint16) written from the PNG spec: IHDR, IDAT, IEND."""
    h, w = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def jpeg_with_orientation(orientation: int) -> bytes:
    """A 40 x 20 JPEG (landscape pixels): grey, a red 8 x 8 block at the top-left, EXIF orientation tag set."""
    im = Image.new("RGB", (40, 20), (128, 128, 128))
    im.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def read_mds(out: Path) -> list[dict]:
    from streaming import LocalDataset

    ds = LocalDataset(local=str(out))
    return [ds[i] for i in range(len(ds))]


def test_pillow_alone_turns_16bit_grey_white():
    """The bug being fixed: PIL's convert("RGB") clips I;16 at 255 (99.6 % white for a full-range ramp)."""
    white = (np.asarray(Image.fromarray(RAMP16).convert("RGB")) == 255).mean()
    assert white == pytest.approx(255 / 256)


def test_decode_scales_16bit_grey_rgb_and_tiff():
    buf = io.BytesIO()
    Image.fromarray(GREY16).save(buf, format="PNG")  # PIL writes I;16 as a 16-bit grey PNG
    x = decode_image(buf.getvalue())
    assert x.shape == (3, 2, 4) and (x == torch_tensor(GREY8)).all()

    buf = io.BytesIO()
    Image.fromarray(GREY16).save(buf, format="TIFF")
    assert (decode_image(buf.getvalue()) == torch_tensor(GREY8)).all()

    rgb16 = np.stack([GREY16, 65535 - GREY16, GREY16 // 2], axis=-1)
    x = decode_image(png_16bit(rgb16))
    expected = np.stack([GREY8, (65535 - GREY16) >> 8, (GREY16 // 2) >> 8], axis=0)
    assert (x.numpy() == expected).all()
    assert expected[1].tolist() == [[255, 255, 254, 254], [128, 127, 0, 0]]  # hand check of >> 8

    assert (np.asarray(open_rgb(png_16bit(GREY16)))[..., 0] == GREY8).all()  # eval / viz opener


def torch_tensor(grey8: np.ndarray):
    import torch

    return torch.from_numpy(np.broadcast_to(grey8, (3, *grey8.shape)).copy())


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_exif_orientation_6_is_applied_at_read_time(decoder):
    """Orientation 6: the stored pixels are shown rotated 90 degrees clockwise, so 40 x 20 becomes
    20 wide x 40 high and the stored top-left block lands at the top-right."""
    data = jpeg_with_orientation(6)
    if decoder == "torchvision":
        x = decode_image(data).numpy().transpose(1, 2, 0)
    else:
        x = np.asarray(open_rgb(data))
    assert x.shape == (40, 20, 3)
    r, g, b = (int(v) for v in x[2, 17])  # inside the block, top-right
    assert r > 200 and g < 60 and b < 60
    assert abs(int(x[2, 2, 0]) - 128) < 10  # top-left is grey now


def test_convert_scales_rotates_and_counts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(RAMP16).save(src / "ramp16.png")
    Image.fromarray(GREY16).save(src / "grey16.tif")
    (src / "rgb16.png").write_bytes(png_16bit(np.stack([RAMP16, RAMP16[::-1], RAMP16.T], axis=-1)))
    (src / "portrait.jpg").write_bytes(jpeg_with_orientation(6))
    Image.new("RGB", (12, 10), (10, 200, 30)).save(src / "plain.png")  # needs neither rule: stored as is
    out = tmp_path / "mds"
    res = runner.invoke(data_app, ["convert", str(src), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "3 scaled from 16 to 8 bit, 1 turned upright by their EXIF orientation" in res.output

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 5 and manifest["num_skipped"] == 0
    assert (manifest["num_scaled_from_16bit"], manifest["num_exif_transposed"], manifest["num_resized"]) == (3, 1, 0)
    assert manifest["image_formats"] == {"JPEG": 1, "PNG": 4}  # the TIFF is stored as PNG

    samples = {s["key"]: s for s in read_mds(out)}
    ramp = Image.open(io.BytesIO(samples["ramp16.png"]["image"]))
    assert ramp.mode == "L" and (np.asarray(ramp) == np.arange(256).reshape(16, 16)).all()  # i * 257 >> 8 = i
    grey = Image.open(io.BytesIO(samples["grey16.tif"]["image"]))
    assert grey.format == "PNG" and (np.asarray(grey) == GREY8).all()
    rgb = np.asarray(Image.open(io.BytesIO(samples["rgb16.png"]["image"])))
    assert (rgb[..., 0] == np.arange(256).reshape(16, 16)).all()
    assert (rgb[..., 1] == np.arange(256).reshape(16, 16)[::-1]).all()

    portrait = Image.open(io.BytesIO(samples["portrait.jpg"]["image"]))
    assert portrait.format == "JPEG" and portrait.size == (20, 40)
    assert portrait.getexif().get(0x0112, 1) == 1  # no orientation left to apply twice
    r, g, b = portrait.getpixel((17, 2))
    assert r > 200 and g < 60 and b < 60
    assert manifest["width"]["min"] == 4 and manifest["height"]["max"] == 40  # upright sizes

    plain = tmp_path / "src" / "plain.png"
    assert samples["plain.png"]["image"] == plain.read_bytes()


def test_manifest_counts_are_zero_for_plain_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(src / "a.png")
    report = convert_to_mds(src, tmp_path / "out", progress=False)
    assert report.manifest["num_scaled_from_16bit"] == 0 and report.manifest["num_exif_transposed"] == 0
