"""Stage 4 (embed): one L2-normalised embedding per image, fp16, in a memory-mapped file.

Embedders (``--model``):
- a backbone dvtrain can load (a run directory, a training checkpoint, a ``dvtrain export``
  output, a Hugging Face directory, a facebookresearch/dinov2 hub file): the final block's
  normalised CLS token (``x_norm_clstoken``) of the classification eval transform
  (:func:`dvtrain.eval.features.eval_transform`) with the shorter side resized to
  ``--image-size`` and no border crop (the whole image, as the main job's k-NN feeds it; see
  docs/deviations.md), L2-normalised; this is how the DINOv2 paper (section 3) embeds its pool for
  retrieval and deduplication;
- ``pixels``: the raw-pixel baseline, a 16 x 16 grayscale thumbnail (box filter), mean
  removed, L2-normalised (256 dims; :func:`.crops.thumbnail`). No model needed; useful for tests
  and as a baseline.

Several processes (``dvtrain data curate`` under torchrun / the ``deepspeed`` launcher): rank 0
creates the file (:func:`create_embeddings_file`), every rank fills its contiguous slice of rows
(:func:`embed_rows`, opened ``r+``); :mod:`.pipeline` coordinates them.

This module is the one place curation imports checkpoint loading from (``load_backbone`` and
``detect_checkpoint_format``), so it can follow the checkpoint package when that moves.

Shape legend: N images, D embedding width, B batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dvtrain.checkpoint.backbone import detect_checkpoint_format, load_backbone
from dvtrain.data.curate.crops import THUMB_SIDE, thumbnail
from dvtrain.data.curate.pool import open_payload

__all__ = ["Embedder", "PIXELS", "check_model", "create_embeddings_file", "embed_rows", "make_embedder",
           "write_embeddings"]

PIXELS = "pixels"
PIXEL_SIDE = THUMB_SIDE


def check_model(model: str) -> None:
    """Fail fast on a ``--model`` that cannot load (before any image is decoded).

    Raises:
        ValueError: the path does not exist or is not a checkpoint kind dvtrain reads.
    """
    if model == PIXELS:
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"--model {model} does not exist; give a run directory, a checkpoint, a "
                         f"`dvtrain export` output, a Hugging Face directory, or 'pixels'")
    try:
        detect_checkpoint_format(path)
    except ValueError as e:
        raise ValueError(f"--model {model} cannot be loaded: {e}") from None


class Embedder:
    """Turns decoded images into L2-normalised embeddings.

    Args:
        model: ``"pixels"`` or a checkpoint path (see module docstring).
        image_size: input side (px) of a backbone (shorter side resized to it, then centre-cropped
            square).
        device: torch device for a backbone.

    Attributes:
        dim: D, the embedding width.
        name: what embedded (recorded in the report).

    Raises:
        ValueError: the checkpoint cannot be loaded.
    """

    def __init__(self, model: str, image_size: int = 224, device: str = "cpu") -> None:
        self.model_name = model
        self.image_size = image_size
        self.device = torch.device(device)
        if model == PIXELS:
            self.backbone = None
            self.dim = PIXEL_SIDE * PIXEL_SIDE
            self.name = f"pixels ({PIXEL_SIDE}x{PIXEL_SIDE} grayscale)"
        else:
            check_model(model)
            try:
                loaded = load_backbone(model, device=device)
            except ValueError as e:
                raise ValueError(f"--model {model} cannot be loaded: {e}") from None
            self.backbone = loaded.model.eval()
            self.dim = int(self.backbone.embed_dim)
            self.name = f"{loaded.source_format} backbone {model} (CLS, {image_size} px)"

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed decoded images.

        Args:
            images: B PIL images, any mode and size.

        Returns:
            [B, D] fp32, unit L2 norm per row.
        """
        if self.backbone is None:
            return np.stack([thumbnail(im) for im in images]) if images else \
                np.zeros((0, self.dim), np.float32)
        from dvtrain.eval.features import eval_transform, extract_features

        x = torch.stack([eval_transform(im, self.image_size, self.image_size) for im in images])
        feats = extract_features(self.backbone, [(x, torch.zeros(len(images), dtype=torch.int64))],
                                 device=self.device, gather=False)
        e = torch.nn.functional.normalize(feats.cls_ND.float(), dim=1)
        return e.numpy()


def make_embedder(model: str, image_size: int = 224, device: str | None = None) -> Embedder:
    """An :class:`Embedder` on CUDA when available (unless ``device`` is given)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Embedder(model, image_size, device)


def create_embeddings_file(path: str | os.PathLike, n: int, dim: int) -> None:
    """Create the fp16 memmap ``path`` ([N, D], C order, ``.npy`` header) that
    :func:`embed_rows` fills; rows start as zeros."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    out.flush()
    del out


def embed_rows(embedder: Embedder, payloads: Sequence[Any], path: str | os.PathLike, start: int = 0,
               batch_size: int = 64, on_batch: Callable[[int], None] | None = None) -> None:
    """Embed ``payloads`` into rows ``[start, start + len(payloads))`` of the existing fp16 memmap
    ``path`` (opened ``r+``), batch by batch; the rest of the file is left alone, so several
    processes can fill disjoint row ranges of one file (the embed stage under several ranks).

    Batches start at ``start``, ``start + batch_size``, ...; a slice that starts at a multiple of
    ``batch_size`` therefore sees the same batches as one process embedding every row.
    An image that fails to decode here (it decoded in the quality stage) gets a zero row.

    Args:
        on_batch: called with the number of this call's rows done so far.

    Raises:
        ValueError: the file's shape cannot hold the rows, or its width is not ``embedder.dim``.
    """
    out = np.load(path, mmap_mode="r+")
    if out.dtype != np.float16 or out.ndim != 2 or out.shape[1] != embedder.dim \
            or start + len(payloads) > out.shape[0]:
        raise ValueError(f"{path}: {out.dtype} {out.shape} cannot take rows {start}.."
                         f"{start + len(payloads)} of width {embedder.dim} (fp16)")
    for s0 in range(0, len(payloads), batch_size):
        ims = []
        bad = []
        for j, p in enumerate(payloads[s0:s0 + batch_size]):
            try:
                ims.append(open_payload(p)[0])
            except Exception:  # noqa: BLE001 - changed on disk since the quality stage
                ims.append(Image.new("L", (8, 8)))
                bad.append(j)
        e = embedder.embed_images(ims)
        e[bad] = 0.0
        out[start + s0:start + s0 + len(ims)] = e.astype(np.float16)
        if on_batch:
            on_batch(s0 + len(ims))
    out.flush()
    del out


def write_embeddings(embedder: Embedder, payloads: Sequence[Any], path: str | os.PathLike,
                     batch_size: int = 64,
                     on_batch: Callable[[int], None] | None = None) -> np.memmap:
    """Embed every payload into a new fp16 memmap ``path`` ([N, D], C order), batch by batch
    (:func:`create_embeddings_file` + :func:`embed_rows` in one process).

    Returns:
        The memmap, opened read-only.
    """
    create_embeddings_file(path, len(payloads), embedder.dim)
    embed_rows(embedder, payloads, path, 0, batch_size, on_batch)
    return np.load(path, mmap_mode="r")
