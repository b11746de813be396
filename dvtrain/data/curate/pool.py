"""The image pool a curation runs over: the sources ``dvtrain data convert`` reads, plus MDS.

SRC is listed with the converter's own source reader (:func:`dvtrain.data.shards.build_source`:
image folders, path lists, IDX, ``.npy``/``.npz``), or, when SRC is a local MDS directory (it holds
``index.json``), read sample by sample with streaming's ``LocalDataset`` (columns ``image`` and
optionally ``label``/``key``, as ``data convert`` writes them).

A pool item is addressed by its index ``i`` in ``[0, N)``; ``payload(i)`` is what a worker process
needs to read it (a path, a small uint8 array, or ``(mds_dir, index)``), so the items can be decoded
in a process pool without pickling the whole pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dvtrain.data import images, shards

__all__ = ["Pool", "list_pool", "read_payload", "open_payload"]


@dataclass
class Pool:
    """An indexed image pool.

    Attributes:
        src: what was listed (path string).
        kind: "folder" | "list" | "idx" | "npy" | "npz" | "mds".
        keys: [N] sample names (path relative to SRC, ``name[i]`` for arrays, MDS ``key``).
        labels: [N] int64 labels (-1 when unlabelled); curation never reads them, they are
            copied to the output.
        label_names: class names by label when known.
        pre_skipped: entries rejected while listing (``{"path", "reason"}``).
        other_files: files of a folder SRC that are not images by their extension, never read,
            counted by extension (``{".txt": 3}``).
    """

    src: str
    kind: str
    keys: list[str]
    labels: np.ndarray
    label_names: list[str] | None = None
    pre_skipped: list[dict[str, str]] = field(default_factory=list)
    _paths: list[str | None] | None = None
    _arrays: list[np.ndarray] | None = None
    other_files: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def payload(self, i: int) -> Any:
        """What :func:`read_payload` needs for item ``i`` (picklable, small)."""
        if self.kind == "mds":
            return ("mds", self.src, int(i))
        if self._arrays is not None:
            return ("array", self._arrays[i])
        assert self._paths is not None
        return ("path", self._paths[i])


def list_pool(src: str | os.PathLike, what: str = "source") -> Pool:
    """List an image pool (no decoding).

    Args:
        src: image folder, path list, IDX/.npy/.npz, or a local MDS directory.
        what: how messages name it ("source", "--against", "--seed-set").

    Returns:
        Pool with N >= 1 items.

    A folder whose images are all inside subfolders is labelled by subfolder name (as ``dvtrain
    data convert`` does); a folder with images both at its top level and in subfolders is curated
    whole, without labels, with a warning.

    Raises:
        ValueError: ``src`` missing, unreadable, of an unknown kind, or empty.
    """
    path = Path(src).expanduser()
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise ValueError(f"{what} {path} is not readable (permission denied); make it readable "
                         f"(chmod +r) or run as a user who can read it")
    if path.is_dir() and (path / "index.json").is_file():
        from streaming import LocalDataset

        ds = LocalDataset(local=str(path))
        n = len(ds)
        if n == 0:
            raise ValueError(f"{what} {path}: the MDS dataset has no samples")
        first = ds[0]
        if "image" not in first:
            raise ValueError(f"{what} {path}: MDS samples need an 'image' column (bytes), found "
                             f"{sorted(first)}")
        keys, labels = [], []
        for i in range(n):  # reads every sample once; MDS pools are local and bounded
            s = ds[i]
            keys.append(str(s.get("key", f"{path.name}[{i}]")))
            labels.append(int(s.get("label", -1)))
        names = None
        mf = path / shards.MANIFEST_NAME
        if mf.is_file():
            names = shards.read_manifest(path).get("label_names")
        return Pool(str(path), "mds", keys, np.asarray(labels, np.int64), names)
    if path.is_dir():
        unreadable = [d for d, _, _ in os.walk(path) if not os.access(d, os.R_OK | os.X_OK)]
        if unreadable:
            raise ValueError(f"{what} {path}: directory {unreadable[0]} is not readable "
                             f"(permission denied); its images would be silently missing")
    source = shards.build_source(path, "auto", None)
    outside = [r for r in source.pre_skipped if r["reason"].startswith("not inside a class folder")]
    if outside:  # a raw dump is rarely tidy: curate every image, labels only when all are in folders
        from dvtrain.errors import warn

        source = shards.build_source(path, "none", None)
        warn(f"{what} {path} has {len(outside)} image(s) at its top level (e.g. {outside[0]['path']}) "
             f"beside subfolders: all {len(source.tasks)} images are curated, without class labels "
             f"(labels come from the subfolder names only when every image is inside one)")
    tasks = source.tasks
    if not tasks:
        raise shards.no_images_error(f"{what} {path}", source)
    arrays = [t.array for t in tasks] if tasks[0].array is not None else None
    paths = None if arrays is not None else [t.path for t in tasks]
    return Pool(str(path), source.kind, [t.key for t in tasks],
                np.asarray([t.label for t in tasks], np.int64), source.label_names,
                list(source.pre_skipped), paths, arrays, dict(source.other_files))


_MDS_CACHE: dict[str, Any] = {}


def read_payload(payload: Any) -> tuple[bytes | None, np.ndarray | None]:
    """(encoded bytes, None) for files/MDS, (None, uint8 array) for arrays.

    Raises:
        OSError: the file cannot be read.
    """
    kind = payload[0]
    if kind == "array":
        return None, payload[1]
    if kind == "mds":
        from streaming import LocalDataset

        ds = _MDS_CACHE.get(payload[1])
        if ds is None:
            ds = _MDS_CACHE[payload[1]] = LocalDataset(local=payload[1])
        return bytes(ds[payload[2]]["image"]), None
    with open(payload[1], "rb") as f:
        return f.read(), None


def open_payload(payload: Any) -> tuple[Image.Image, bytes | None]:
    """Fully decoded PIL image of a payload, and its encoded bytes (None for arrays).

    Decode checks are the converter's (``verify`` then ``load``: truncated files fail).

    Raises:
        OSError, ValueError, PIL errors: unreadable or undecodable.
    """
    data, array = read_payload(payload)
    if array is not None:
        a = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
        return Image.fromarray(a), None
    assert data is not None
    return images.open_rgb(data), data  # the one decode: 8-bit, EXIF orientation applied


def encoded_bytes(payload: Any) -> bytes:
    """The bytes an output MDS sample stores: the file as found, or lossless PNG for arrays
    (what ``dvtrain data convert`` stores)."""
    data, array = read_payload(payload)
    if data is not None:
        return data
    im, _ = open_payload(payload)
    return images.encode(im, "PNG")
