"""Image decoding: the one place where encoded bytes become 8-bit, upright pixels.

Every reader goes through here: ``dvtrain data convert`` (:func:`decode_for_storage`, which decides
what the shards store), the training loader and ``data inspect`` (:func:`decode_image`, a uint8 tensor),
evaluation and the viz commands (:func:`open_rgb` / :func:`to_rgb`, a PIL image). Two rules that
PIL's ``Image.open(...).convert("RGB")`` gets wrong:

- **16-bit samples are scaled to 8 bit** as ``x >> 8`` (``floor(x / 256)``, what libpng's
  ``png_set_strip_16`` and Pillow's own 48-bit RGB PNG reader do, so grey and colour 16-bit images
  agree). Pillow opens a 16-bit grey PNG/TIFF as mode ``I;16`` and ``convert`` clips it at 255,
  which turns a full-range image ~99.6 % white. Mode ``I`` (32-bit integers, e.g. 16-bit data read by
  other Pillow versions) is clipped to 0..65535 first. Float (``F``) images keep Pillow's conversion.
- **EXIF orientation is applied** (``PIL.ImageOps.exif_transpose``: phones store portrait photos as
  landscape pixels plus an orientation tag). JPEG is decoded by torchvision's libjpeg-turbo decoder
  with ``apply_exif_orientation=True`` (faster than PIL, raises on truncated files), the rest by PIL.

At conversion, an image that needs either rule is re-encoded (JPEG sources as JPEG q95 4:4:4, others
as lossless PNG), so shards hold only 8-bit, upright images and any MDS reader sees what dvtrain trains on.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

__all__ = ["DecodedImage", "decode_for_storage", "decode_image", "encode", "is_high_bit_depth", "open_rgb", "resize_max_side",
           "to_8bit", "to_rgb", "ORIENTATION_TAG"]

#: EXIF tag of the orientation (1 = upright; 2-8 = mirrored and/or rotated).
ORIENTATION_TAG = 0x0112
JPEG_QUALITY = 95  # re-encoding quality (4:4:4 chroma) for JPEG sources that must be re-encoded
_JPEG_MAGIC = b"\xff\xd8"
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

# torchvision 0.29 warns that its codecs are deprecated (in favour of torchcodec) when it is imported;
# dvtrain uses them while they exist (registered here, before anything imports torchvision.io).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)



@functools.cache
def _jpeg_decoder() -> Callable[[bytes], Any] | None:
    """torchvision's libjpeg-turbo decoder (RGB, EXIF orientation applied), or None without it.

    Imported on first use, so conversion worker processes that never call :func:`decode_image` do not
    import torch. ~25 % faster than PIL here.
    """
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - future torchvision without codecs
        return None

    def decode(data: bytes):
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=True)

    return decode


def _rawmodes(im: Image.Image) -> list[str]:
    """The decoder raw modes of a not-yet-loaded image (``"I;16B"``, ``"RGB;16B"``, ``("I;16", 0, 1)``...)."""
    out = []
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, str):
            out.append(args)
        elif isinstance(args, tuple) and args and isinstance(args[0], str):
            out.append(args[0])
    return out


def is_high_bit_depth(im: Image.Image) -> bool:
    """True when the file stores more than 8 bits per sample (16-bit grey, 16-bit RGB(A), 32-bit integer).

    Call before ``im.load()``: Pillow reduces 16-bit RGB to mode ``RGB`` while loading and forgets the
    raw mode afterwards.
    """
    return im.mode in _16BIT_MODES or im.mode == "I" or any(";16" in r for r in _rawmodes(im))


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``) or 32-bit integer (``I``) grey image as 8-bit ``L`` via ``x >> 8``; others unchanged.

    Args:
        im: a loaded PIL image.

    Returns:
        mode ``L`` (values ``min(max(x, 0), 65535) >> 8``) for ``I;16*``/``I`` input, else ``im`` itself.
    """
    if im.mode not in _16BIT_MODES and im.mode != "I":
        return im
    x = np.asarray(im)
    if x.dtype.byteorder not in ("=", "|"):
        x = x.astype(x.dtype.newbyteorder("="))
    x = np.clip(x.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(x.astype(np.uint8), mode="L")


@dataclass
class DecodedImage:
    """A fully decoded image and what was done to it.

    Attributes:
        image: loaded PIL image, 8 bits per sample (``L``, ``LA``, ``RGB``, ``RGBA``, ``P``, ``CMYK``...),
            upright.
        format: the source format as PIL names it (``JPEG``, ``PNG``, ``TIFF``...).
        scaled_from_16bit: the source had more than 8 bits per sample and was scaled (:func:`to_8bit`).
        exif_transposed: the source had an EXIF orientation other than 1, now applied.
    """

    image: Image.Image
    format: str
    scaled_from_16bit: bool
    exif_transposed: bool


def _decode_pil(data: bytes, verify: bool) -> DecodedImage:
    if not data:
        raise ValueError("empty file (0 bytes)")
    if verify:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums; load() below catches truncation verify() misses
    im = Image.open(io.BytesIO(data))
    fmt = im.format or "UNKNOWN"
    high = is_high_bit_depth(im)
    im.load()  # decodes every pixel
    orientation = im.getexif().get(ORIENTATION_TAG, 1)
    transposed = orientation not in (1, None)
    if transposed:
        im = ImageOps.exif_transpose(im)
    return DecodedImage(to_8bit(im), fmt, high, transposed)


def decode_for_storage(data: bytes, max_side: int | None = None) -> tuple[bytes, str, int, int, dict[str, bool]]:
    """What ``dvtrain data convert`` stores for one source file: the bytes as they are, or re-encoded.

    The file is verified and fully decoded (truncated or corrupt files raise). It is re-encoded when it
    is 16-bit, carries an EXIF orientation other than 1, or its longer side exceeds ``max_side`` (then
    resized with Lanczos, aspect kept): JPEG sources as JPEG q95 4:4:4, everything else as PNG.

    Args:
        data: the encoded file.
        max_side: longest side in pixels after conversion; None keeps the size.

    Returns:
        (bytes to store, their format, width px, height px, {"resized", "scaled_from_16bit",
        "exif_transposed"}) - width and height of the stored, upright image.

    Raises:
        ValueError: empty data. PIL's errors (``UnidentifiedImageError``, ``OSError``, ``SyntaxError``...)
            for data that does not decode.
    """
    dec = _decode_pil(data, verify=True)
    im = dec.image
    w, h = im.size
    resize = max_side is not None and max(w, h) > max_side
    notes = {"resized": resize, "scaled_from_16bit": dec.scaled_from_16bit, "exif_transposed": dec.exif_transposed}
    if not (resize or dec.scaled_from_16bit or dec.exif_transposed):
        return data, dec.format, w, h, notes
    if resize:
        assert max_side is not None
        im = resize_max_side(im, max_side)
    out_fmt = "JPEG" if dec.format == "JPEG" else "PNG"
    return encode(im, out_fmt), out_fmt, im.size[0], im.size[1], notes


def resize_max_side(im: Image.Image, max_side: int) -> Image.Image:
    """``im`` resized (Lanczos, aspect kept) so its longer side is ``max_side`` px; odd modes become RGB(A)."""
    w, h = im.size
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    return im.resize(size, Image.Resampling.LANCZOS)


def encode(im: Image.Image, fmt: str) -> bytes:
    """Encode ``im`` as ``"JPEG"`` (q95, 4:4:4 chroma; converted to RGB unless L/RGB) or ``"PNG"`` (lossless)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened PIL image as 8-bit, upright RGB (EXIF orientation applied, 16-bit scaled, then ``convert``).

    Images without EXIF data (most PNGs, every array-converted sample) skip the EXIF parse.
    """
    if "exif" in im.info or im.format in ("JPEG", "MPO", "TIFF", "WEBP"):
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
    return to_8bit(im).convert("RGB")


def open_rgb(path_or_bytes: str | Path | bytes) -> Image.Image:
    """A fully decoded, 8-bit, upright RGB PIL image from a path or encoded bytes.

    Raises:
        ValueError: the file does not exist or does not decode as an image (the message names it).
    """
    what = "<bytes>" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    try:
        if isinstance(path_or_bytes, (bytes, bytearray)):
            data = bytes(path_or_bytes)
        else:
            path = Path(path_or_bytes)
            if not path.is_file():
                raise ValueError(f"image {path_or_bytes} does not exist")
            data = path.read_bytes()
        return _decode_pil(data, verify=False).image.convert("RGB")
    except ValueError as exc:
        if str(exc).startswith("image "):
            raise
        raise ValueError(f"cannot decode image {what}: {exc}") from exc
    except Exception as exc:  # PIL raises many types for undecodable data
        raise ValueError(f"cannot decode image {what}: {exc}") from exc


def decode_image(data: bytes) -> "torch.Tensor":
    """Decode image bytes to an upright, 8-bit RGB tensor (the training loader's decode).

    JPEG goes through torchvision's libjpeg-turbo decoder with the EXIF orientation applied; every other
    format through PIL (:func:`_decode_pil`: orientation applied, 16-bit scaled by ``>> 8``;
    ``LOAD_TRUNCATED_IMAGES`` untouched).

    Args:
        data: encoded image (JPEG, PNG, TIFF, BMP, ...).

    Returns:
        uint8 tensor [3, H, W] (grayscale, palette and 16-bit images converted to RGB).

    Raises:
        RuntimeError / OSError / ValueError from the decoders when ``data`` does not decode.
    """
    import torch

    if not data:
        raise ValueError("empty file (0 bytes)")
    jpeg = _jpeg_decoder() if data[:2] == _JPEG_MAGIC else None
    if jpeg is not None:
        return jpeg(data)
    with Image.open(io.BytesIO(data)) as im:
        rgb = to_rgb(im)  # a new image; the source closes on leaving the block
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()
