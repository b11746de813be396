"""Convert image datasets into MosaicML Streaming MDS shards.

Sources (``convert_to_mds``'s ``src``):
- an image-folder tree (``SRC/<class>/**/<image>``; class folders sorted by name give the integer
  labels, exactly like ``torchvision.datasets.ImageFolder``), or any folder with ``labels="none"``;
- a text file listing one image path per line, optionally followed by an integer label
  (``path<TAB or space or comma>label``; relative paths are relative to the list file; ``#`` starts
  a comment);
- an array dataset: IDX files (``*-idx3-ubyte``, optionally ``.gz``, as Fashion-MNIST ships them),
  ``.npy`` (images only) or ``.npz`` (arrays ``images`` and optional ``labels``). Labels of IDX /
  ``.npy`` images come from ``labels_file`` (IDX1, ``.npy`` or text), or from the sibling
  ``*-labels-idx1-ubyte[.gz]`` file when one exists.

Output (local directory or an object-store URL that mosaicml-streaming uploads to):
- MDS shards with columns ``image`` (bytes: JPEG/PNG/... as found, or re-encoded when resized,
  16-bit or EXIF-rotated - see :mod:`dvtrain.data.images`; arrays become lossless PNG), ``label`` (int, -1 when unlabelled) and ``key`` (str: the source path
  relative to SRC, or ``name[index]`` for arrays), plus streaming's ``index.json``;
- ``manifest.json``, written last: counts (resized, scaled from 16 bit, turned upright by EXIF),
  label names and per-label counts, image formats, skipped files with their reasons, and the source
  description.

Every image is decoded fully at conversion (``verify`` then ``load``,
:func:`dvtrain.data.images.decode_for_storage`); files that do not decode
(truncated, corrupt, empty, not an image) are skipped and listed in the manifest. The output is
deterministic: same source -> identical shard bytes. A local output is written to
``OUT.tmp-<pid>`` and renamed at the end, so an interrupted conversion never looks complete.
Remote outputs get ``index.json`` after all shards and ``manifest.json`` last.

Reference: dinov2 reads ImageNet through ``dinov2/data/datasets/image_net.py`` (its own extra-file
format); this module replaces that with streaming's MDS format.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import multiprocessing as mp
import numpy as np
from PIL import Image, ImageFile

from dvtrain import installed_version
from dvtrain.checkpoint.atomic import write_json_atomic
from dvtrain.data.images import decode_for_storage, encode, resize_max_side
from dvtrain.data.remote import check_remote, is_remote

__all__ = [
    "COLUMNS",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "ConversionReport",
    "convert_to_mds",
    "load_idx",
    "read_manifest",
]

COLUMNS: dict[str, str] = {"image": "bytes", "label": "int", "key": "str"}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dvtrain-mds-manifest"
MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
LABEL_MODES = ("auto", "from-folders", "none")
_ARRAY_SUFFIXES = (".npy", ".npz")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------------------------
# IDX / NumPy arrays


def _open_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or raw.

    Args:
        path: ``*-idx3-ubyte`` (images) or ``*-idx1-ubyte`` (labels), optionally ``.gz``
            (detected from the gzip magic bytes, not the suffix).

    Returns:
        Array with the file's shape and dtype, e.g. uint8 [N, 28, 28] for Fashion-MNIST images and
        uint8 [N] for its labels (multi-byte IDX types are converted to native byte order).

    Raises:
        ValueError: the file is not IDX (bad magic), has an unknown type code, or its payload size
            does not match the header.
    """
    path = Path(path)
    raw = _open_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the first two bytes must be zero)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}; valid: "
                         f"{sorted(hex(k) for k in _IDX_DTYPES)}")
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {dims} ({expected} bytes) but the payload "
                         f"has {len(raw) - header} bytes; the file is truncated or corrupt")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _is_idx_path(path: Path) -> bool:
    name = path.name.lower()
    return "-idx" in name or name.endswith((".idx", ".idx.gz"))


def _load_labels_file(path: Path, n: int) -> np.ndarray:
    """Labels int64 [n] from IDX1 / .npy / text (one integer per line)."""
    if not path.is_file():
        raise ValueError(f"labels file {path} does not exist")
    if path.suffix == ".npy":
        labels = np.load(path)
    elif _is_idx_path(path):
        labels = load_idx(path)
    else:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        try:
            labels = np.array([int(ln) for ln in lines])
        except ValueError as e:
            raise ValueError(f"labels file {path}: every line must be one integer ({e})") from None
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels file {path} has {labels.shape[0]} labels but the images have {n}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels file {path}: labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _sibling_idx_labels(path: Path) -> Path | None:
    """Fashion-MNIST naming: train-images-idx3-ubyte.gz -> train-labels-idx1-ubyte.gz."""
    name = path.name
    if "images" not in name or "idx3" not in name:
        return None
    candidate = path.with_name(name.replace("images", "labels").replace("idx3", "idx1"))
    return candidate if candidate.is_file() else None


# ----------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Task:
    """One sample to validate/encode: a file path or an in-memory array."""

    key: str
    label: int
    path: str | None = None
    array: np.ndarray | None = None


@dataclass
class ImageSource:
    """What ``data convert`` / ``data curate`` read: the entries found in SRC, in order."""

    kind: str  # "folder" | "list" | "idx" | "npy" | "npz"
    description: dict[str, Any]
    tasks: list[_Task]
    label_names: list[str] | None
    pre_skipped: list[dict[str, str]]  # found but rejected before decoding (reason given)
    # files of a folder source that are not images by their extension, never read: {".txt": 3}
    other_files: dict[str, int] = field(default_factory=dict)


def other_files_text(other: dict[str, int]) -> str:
    """``ImageSource.other_files`` in words: ``"3 file(s) that are not images by their extension:
    .json 2, .txt 1 (images: .jpg, ...)"``."""
    return (f"{sum(other.values())} file(s) that are not images by their extension: "
            f"{', '.join(f'{k} {v}' for k, v in other.items())} (images: {', '.join(IMAGE_EXTENSIONS)})")


def no_images_error(what: str, source: ImageSource) -> ValueError:
    """The error for a source without images, naming the other files it holds."""
    found = f"; it holds {other_files_text(source.other_files)}" if source.other_files else \
        f" (extensions {', '.join(IMAGE_EXTENSIONS)})"
    return ValueError(f"{what}: found no images{found}")


def _has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: Path, others: Counter[str] | None = None) -> list[Path]:
    """All image files under root, sorted by relative POSIX path; hidden entries skipped.

    ``others``, when given, counts the other (non-hidden) files by lower-case extension
    (``"(none)"`` without one)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            if _has_image_suffix(fn):
                found.append(Path(dirpath) / fn)
            elif others is not None:
                others[Path(fn).suffix.lower() or "(none)"] += 1
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _folder_source(src: Path, labels: str) -> ImageSource:
    subdirs = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if labels == "auto":
        labels = "from-folders" if subdirs else "none"
    tasks: list[_Task] = []
    pre_skipped: list[dict[str, str]] = []
    label_names: list[str] | None = None
    others: Counter[str] = Counter()
    if labels == "from-folders":
        if not subdirs:
            raise ValueError(f"{src} has no class subfolders; --labels from-folders needs "
                             f"SRC/<class>/<images>. Use --labels none for an unlabelled folder.")
        label_names = subdirs
        class_of = {name: i for i, name in enumerate(subdirs)}
        for path in _walk_images(src, others):
            rel = path.relative_to(src).as_posix()
            top = rel.split("/", 1)[0]
            if "/" not in rel:
                pre_skipped.append({"path": rel, "reason": "not inside a class folder "
                                    "(--labels from-folders)"})
                continue
            tasks.append(_Task(key=rel, label=class_of[top], path=str(path)))
    else:
        for path in _walk_images(src, others):
            tasks.append(_Task(key=path.relative_to(src).as_posix(), label=-1, path=str(path)))
    desc = {"kind": "folder", "path": str(src), "labels": labels}
    return ImageSource("folder", desc, tasks, label_names, pre_skipped, dict(sorted(others.items())))


def _parse_list_line(line: str) -> tuple[str, int | None]:
    """'path', 'path 3', 'path\\t3', 'path,3' -> (path, label or None)."""
    for sep in ("\t", ",", " "):
        if sep in line:
            head, _, tail = line.rpartition(sep)
            tail = tail.strip()
            if head.strip() and tail.lstrip("-").isdigit():
                return head.strip(), int(tail)
    return line, None


def _list_source(src: Path, labels: str) -> ImageSource:
    if labels == "from-folders":
        raise ValueError(f"--labels from-folders needs an image folder, but {src} is a list file; "
                         f"put labels in the list ('path<TAB>label') or use --labels none")
    tasks: list[_Task] = []
    pre_skipped: list[dict[str, str]] = []
    any_label = False
    for lineno, line in enumerate(src.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel, label = _parse_list_line(line)
        any_label |= label is not None
        path = Path(rel).expanduser()
        if not path.is_absolute():
            path = src.parent / path
        if labels == "none" or label is None:
            label = -1
        tasks.append(_Task(key=rel, label=label, path=str(path)))
    if labels == "auto" and not any_label:
        labels = "none"
    desc = {"kind": "list", "path": str(src), "labels": "from-list" if labels != "none" else "none"}
    return ImageSource("list", desc, tasks, None, pre_skipped)


def _array_source(src: Path, labels: str, labels_file: Path | None) -> ImageSource:
    if labels == "from-folders":
        raise ValueError(f"--labels from-folders needs an image folder, but {src} is an array file; "
                         f"give --labels-file for IDX/.npy images or an .npz with 'labels'")
    array_labels: np.ndarray | None = None
    if src.suffix == ".npz":
        kind = "npz"
        with np.load(src) as z:
            if "images" not in z:
                raise ValueError(f"{src}: an .npz source needs an array named 'images' "
                                 f"(found {sorted(z.files)})")
            images = z["images"]
            if "labels" in z:
                array_labels = np.asarray(z["labels"]).reshape(-1).astype(np.int64)
    elif src.suffix == ".npy":
        kind = "npy"
        images = np.load(src)
    else:
        kind = "idx"
        images = load_idx(src)
        if labels_file is None and labels != "none":
            labels_file = _sibling_idx_labels(src)
    n = images.shape[0]
    if labels_file is not None:
        array_labels = _load_labels_file(Path(labels_file), n)
    if array_labels is not None and array_labels.shape[0] != n:
        raise ValueError(f"{src}: {n} images but {array_labels.shape[0]} labels")
    if labels == "none":
        array_labels = None
    _check_image_array(images, src)
    tasks = [
        _Task(key=f"{src.name}[{i}]", label=int(array_labels[i]) if array_labels is not None else -1,
              array=images[i])
        for i in range(n)
    ]
    desc = {"kind": kind, "path": str(src), "labels": "none" if array_labels is None else "array",
            "labels_file": str(labels_file) if labels_file is not None else None,
            "array_shape": list(images.shape), "array_dtype": str(images.dtype)}
    return ImageSource(kind, desc, tasks, None, [])


def _check_image_array(images: np.ndarray, src: Path) -> None:
    if images.dtype != np.uint8:
        raise ValueError(f"{src}: image arrays must be uint8 (got {images.dtype}); "
                         f"scale and cast them to uint8 [0, 255] first")
    ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4))
    if not ok:
        raise ValueError(f"{src}: image arrays must be [N, H, W] (grayscale) or [N, H, W, C] with "
                         f"C in 1/3/4 (channels last); got shape {tuple(images.shape)}")


def build_source(src: Path, labels: str, labels_file: Path | None) -> ImageSource:
    """List SRC (an image folder, a path list, IDX, .npy/.npz) without decoding anything.

    Args:
        src: the source path. labels: one of ``LABEL_MODES``. labels_file: labels of an array source.

    Raises:
        ValueError: an unknown label mode, a missing or unreadable source, or no image found.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels={labels!r} is not valid; choose one of {LABEL_MODES}")
    if not src.exists():
        raise ValueError(f"source {src} does not exist")
    if src.is_dir():
        if labels_file is not None:
            raise ValueError("--labels-file applies to IDX/.npy sources only; an image folder takes "
                             "its labels from class subfolders")
        return _folder_source(src, labels)
    if src.suffix in _ARRAY_SUFFIXES or _is_idx_path(src):
        return _array_source(src, labels, labels_file)
    if labels_file is not None:
        raise ValueError("--labels-file applies to IDX/.npy sources only; a list file carries its "
                         "labels per line")
    if src.suffix.lower() in (".txt", ".lst", ".list", ".csv", ".tsv"):
        return _list_source(src, labels)
    raise ValueError(f"cannot tell what {src} is: expected an image folder, a path list (.txt, "
                     f".lst, .csv, .tsv), IDX (*-idx3-ubyte[.gz]) or NumPy (.npy, .npz)")


# ----------------------------------------------------------------------------------------------
# Decode / validate / encode (runs in worker processes)


@dataclass(frozen=True)
class _Result:
    key: str
    label: int
    data: bytes | None
    reason: str | None = None
    fmt: str | None = None
    width: int = 0
    height: int = 0
    resized: bool = False
    scaled_from_16bit: bool = False
    exif_transposed: bool = False


def _process(task: _Task, max_side: int | None) -> _Result:
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a worker process may have inherited the flag
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in a conversion worker")
    try:
        if task.array is not None:
            a = task.array[..., 0] if task.array.ndim == 3 and task.array.shape[-1] == 1 \
                else task.array
            im = Image.fromarray(a)
            if max_side is not None and max(im.size) > max_side:
                im = resize_max_side(im, max_side)
                resized = True
            else:
                resized = False
            return _Result(task.key, task.label, encode(im, "PNG"), None, "PNG", im.size[0],
                           im.size[1], resized)
        assert task.path is not None
        try:
            with open(task.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return _Result(task.key, task.label, None, "file not found")
        except OSError as e:
            return _Result(task.key, task.label, None, f"cannot read file: {e}")
        out, fmt, w, h, notes = decode_for_storage(data, max_side)
        return _Result(task.key, task.label, out, None, fmt, w, h, notes["resized"], notes["scaled_from_16bit"],
                       notes["exif_transposed"])
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return _Result(task.key, task.label, None, error_reason(e))


def error_reason(e: Exception) -> str:
    """Error text without memory addresses (PIL names the BytesIO), so manifests are reproducible."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "(image bytes)", f"{type(e).__name__}: {e}")


def _process_chunk(chunk: list[_Task], max_side: int | None) -> list[_Result]:
    return [_process(t, max_side) for t in chunk]


def _ignore_sigint() -> None:
    """Worker initializer: a Ctrl-C reaches the whole process group; the main process alone stops
    the command (the pool is then shut down), so workers print no traceback of their own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def map_in_workers(fn: Callable[..., list[Any]], items: Sequence[Any], workers: int, *args: Any,
                   chunk_size: int = 64) -> Iterator[Any]:
    """``fn(chunk, *args)`` over chunks of ``items`` in ``workers`` spawn processes (1 = in this
    process); yields the results in item order, with at most ``4 * workers`` chunks in flight.

    ``fn`` must be a module-level function returning one result per item of its chunk; spawn is
    safe when the caller has threads (torch, rich) and the workers import only ``fn``'s module.
    Workers ignore SIGINT; an exception or Ctrl-C in the caller cancels the chunks not started.
    """
    chunks = (list(items[i:i + chunk_size]) for i in range(0, len(items), chunk_size))
    if workers <= 1:
        for c in chunks:
            yield from fn(c, *args)
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint)
    try:
        # The first submits start the workers: with SIGINT blocked, a Ctrl-C meanwhile waits and
        # arrives right after, and the workers start with it blocked, so none prints a traceback
        # while it still imports.
        with _sigint_deferred():
            pending = deque(pool.submit(fn, c, *args) for c in islice(chunks, 4 * workers))
        while pending:
            results = pending.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt, *args))
            yield from results
    finally:
        # a second Ctrl-C must not interrupt the shutdown: a half shut down pool blocks the exit
        with _sigint_ignored():
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """SIGINT blocked in this thread inside the block: a Ctrl-C is held pending and delivered when
    the block ends (never lost); processes started inside inherit the blocked signal (main thread
    only; elsewhere, and where ``pthread_sigmask`` is missing, nothing changes)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block (main thread only; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass
class ConversionReport:
    """What ``convert_to_mds`` wrote.

    Attributes:
        out: the output location (local path or URL).
        manifest: the manifest dict written to ``manifest.json``.
    """

    out: str
    manifest: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def skipped(self) -> list[dict[str, str]]:
        return list(self.manifest["skipped"])


def progress_bar(enabled: bool):
    """The data commands' rich progress bar (count, images/s, skipped, ETA); a silent one when
    ``enabled`` is False. Use as a context manager; tasks take a ``skipped`` field."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[skipped]} skipped"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=False)


def convert_to_mds(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str = "auto",
    labels_file: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    max_side: int | None = None,
    workers: int = 1,
    limit: int | None = None,
    size_limit: int | str = "64mb",
    overwrite: bool = False,
    progress: bool = True,
    on_result: Callable[[int], None] | None = None,
) -> ConversionReport:
    """Convert an image folder / path list / IDX or NumPy arrays into MDS shards + manifest.

    Args:
        src: the source (see module docstring for the accepted layouts).
        out: output directory, or an object-store URL (``s3://bucket/prefix``, ``gs://...``) that
            mosaicml-streaming can upload to (shards are staged in a temporary local directory).
        labels: ``"auto"`` (folder with subfolders -> from-folders, list with labels -> those,
            arrays -> sibling/``labels_file``/npz labels), ``"from-folders"`` or ``"none"``
            (every label -1).
        labels_file: labels for IDX / ``.npy`` images (IDX1, ``.npy`` or one integer per line).
        label_names: class names by label index (recorded in the manifest). Folder sources use
            their class folder names and reject this argument.
        max_side: if set (pixels), images whose longer side exceeds it are resized (Lanczos,
            aspect kept) and re-encoded (JPEG q95 for JPEG sources, PNG otherwise).
        workers: processes that read/decode/validate/encode; output order stays the source order.
        limit: convert only the first ``limit`` source entries (after sorting).
        size_limit: maximum shard size (bytes or streaming's "64mb" notation).
        overwrite: replace an existing local ``out`` (swapped in only after success).
        progress: show a rich progress bar with ETA.
        on_result: called with the running count after each processed entry (tests/interrupts).

    Returns:
        ConversionReport with the manifest.

    Raises:
        ValueError: bad source, labels, ``max_side``/``workers``/``limit``; ``out`` exists and
            ``overwrite`` is False; no source entry decodes; LOAD_TRUNCATED_IMAGES is enabled; a
            remote ``out`` fails :func:`dvtrain.data.remote.check_remote` (credentials, endpoint, bucket).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ValueError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would pass "
                         "validation. Set it to False before converting.")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if is_remote(out):  # credentials, endpoint and bucket before any image is read (bounded, ~30 s)
        check_remote(str(out), "OUT", expect_dataset=False)
    src_path = Path(src).expanduser()
    source = build_source(src_path, labels, Path(labels_file) if labels_file else None)
    if label_names is not None:
        if source.label_names is not None:
            raise ValueError("label names come from the class folders for a folder source; "
                             "drop --label-names")
        source.label_names = [str(n) for n in label_names]
    tasks = source.tasks[:limit] if limit is not None else source.tasks
    pre_skipped = source.pre_skipped
    if not tasks:
        raise no_images_error(str(src_path), source)

    out_str = str(out)
    remote = is_remote(out_str)
    final_dir = None if remote else Path(out_str).expanduser().absolute()
    if final_dir is not None and final_dir.exists() and not overwrite:
        raise ValueError(f"output {final_dir} already exists; pass --overwrite to replace it")
    staging_root = Path(tempfile.mkdtemp(prefix="dvtrain-mds-")) if remote else None
    if remote:
        assert staging_root is not None
        work_dir = staging_root / "shards"
        writer_out: Any = (str(work_dir), out_str)
    else:
        assert final_dir is not None
        work_dir = final_dir.with_name(f"{final_dir.name}.tmp-{os.getpid()}")
        if work_dir.exists():
            shutil.rmtree(work_dir)
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        writer_out = str(work_dir)

    from streaming import MDSWriter

    writer = MDSWriter(out=writer_out, columns=COLUMNS, compression=None, size_limit=size_limit)
    finished = False
    label_counts: Counter[int] = Counter()
    formats: Counter[str] = Counter()
    widths: list[int] = []
    heights: list[int] = []
    skipped = list(pre_skipped)
    num_resized = num_16bit = num_exif = 0
    try:
        with progress_bar(progress) as bar:
            job = bar.add_task("convert", total=len(tasks), skipped=len(skipped))
            for i, res in enumerate(map_in_workers(_process_chunk, tasks, workers, max_side)):
                if res.data is None:
                    skipped.append({"path": res.key, "reason": str(res.reason)})
                else:
                    writer.write({"image": res.data, "label": int(res.label), "key": res.key})
                    label_counts[res.label] += 1
                    formats[str(res.fmt)] += 1
                    widths.append(res.width)
                    heights.append(res.height)
                    num_resized += int(res.resized)
                    num_16bit += int(res.scaled_from_16bit)
                    num_exif += int(res.exif_transposed)
                bar.update(job, advance=1, skipped=len(skipped))
                if on_result is not None:
                    on_result(i + 1)
        num_samples = sum(label_counts.values())
        if num_samples == 0:
            raise ValueError(f"{src_path}: none of the {len(tasks)} images decoded; first failure: "
                             f"{skipped[0]['path']}: {skipped[0]['reason']}")
        writer.finish()  # writes the last shard and index.json (uploads them when remote)
        finished = True
        manifest = build_manifest(source, tasks, num_samples, label_counts, formats, widths, heights,
                                  skipped, num_resized, max_side, limit, num_16bit, num_exif)
        if remote:
            _upload_manifest(manifest, out_str)
        else:
            assert final_dir is not None
            write_json_atomic(work_dir / MANIFEST_NAME, manifest, sort_keys=True)
            swap_into_place(work_dir, final_dir)
    except BaseException:
        if not finished:
            writer.cancel_future_jobs()
        if not remote and work_dir.exists():
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    finally:
        if staging_root is not None:
            shutil.rmtree(staging_root, ignore_errors=True)
    return ConversionReport(out=out_str, manifest=manifest)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp -> final; an existing final (overwrite) is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)  # put the previous complete output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _upload_manifest(manifest: dict[str, Any], remote: str) -> None:
    from streaming.base.storage.upload import CloudUploader

    staging = Path(tempfile.mkdtemp(prefix="dvtrain-manifest-"))
    try:
        write_json_atomic(staging / MANIFEST_NAME, manifest, sort_keys=True)
        uploader = CloudUploader.get((str(staging), remote), keep_local=True, exist_ok=True)
        uploader.upload_file(MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _size_stats(values: list[int]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"min": int(a.min()), "max": int(a.max()), "mean": round(float(a.mean()), 2),
            "median": float(np.median(a))}


def build_manifest(source: ImageSource, tasks: Sequence[_Task], num_samples: int,
                   label_counts: Counter[int], formats: Counter[str], widths: list[int],
                   heights: list[int], skipped: list[dict[str, str]], num_resized: int,
                   max_side: int | None, limit: int | None, num_16bit: int = 0,
                   num_exif: int = 0) -> dict[str, Any]:
    """The ``manifest.json`` of a dataset written from ``source`` (format ``MANIFEST_FORMAT``;
    counts, label names and counts, image sizes and formats, every skipped entry with its reason)."""
    names = source.label_names
    counts = {str(k): int(v) for k, v in sorted(label_counts.items())}
    if names is not None:
        for i in range(len(names)):
            counts.setdefault(str(i), 0)
        counts = dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dvtrain_version": installed_version(),
        "source": source.description,
        "columns": dict(COLUMNS),
        "num_samples": num_samples,
        "num_source_entries": len(tasks) + len(source.pre_skipped),
        "num_skipped": len(skipped),
        "other_files": source.other_files,
        "num_resized": num_resized,
        "num_scaled_from_16bit": num_16bit,
        "num_exif_transposed": num_exif,
        "max_side": max_side,
        "limit": limit,
        "num_labels": len(names) if names is not None else len([k for k in counts if k != "-1"]),
        "label_names": names,
        "label_counts": counts,
        "image_formats": dict(sorted(formats.items())),
        "width": _size_stats(widths),
        "height": _size_stats(heights),
        "skipped": skipped,
    }


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` of a local converted dataset.

    Args:
        out: the local directory ``convert_to_mds`` wrote.

    Returns:
        The manifest dict (see ``convert_to_mds``).

    Raises:
        ValueError: no manifest (not converted by dvtrain, or the conversion did not finish).
    """
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path} not found: {out} is not a finished dvtrain conversion "
                         f"(run `dvtrain data convert SRC {out}`)")
    return json.loads(path.read_text())


def iter_label_names(manifest: dict[str, Any]) -> Iterable[tuple[int, str]]:
    """(label, display name) pairs of a manifest's label histogram, sorted by label."""
    names = manifest.get("label_names")
    for k in sorted(manifest["label_counts"], key=int):
        i = int(k)
        yield i, (names[i] if names is not None and 0 <= i < len(names) else str(i))
