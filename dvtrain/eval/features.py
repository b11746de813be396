"""Frozen-backbone feature extraction for evaluation, gathered across ranks.

Reference: dinov2/eval/utils.py (`extract_features`, `ModelWithIntermediateLayers`) and
dinov2/data/transforms.py (`make_classification_eval_transform`: resize the shorter side to
256/224 of the crop, bicubic, centre crop, ImageNet mean/std).

One pass over the data yields everything k-NN and the linear probes need: the normalised CLS
token of the last `n_last_blocks` blocks and the average of the last block's normalised patch
tokens. The reference instead reruns the backbone on augmented images at every linear-probe
step; see `dvtrain.eval.linear`.

Data: an eval set is a local MDS directory written by `dvtrain data convert` (columns `image`
bytes, `label` int). Each rank reads the samples `rank, rank + world, ...` (no padding, no
duplicates); `all_gather_uneven` reassembles the full set (rank 0's samples first).

Shape legend: B batch, N samples, L blocks, D width, T patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dvtrain import dist
from dvtrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalise
from dvtrain.data.images import open_rgb, to_rgb


# ----------------------------------------------------------------------------------------------
# torch.distributed helpers


def all_gather_uneven(x: Tensor) -> Tensor:
    """Concatenate a tensor over all ranks along dim 0, each rank holding any number of rows.

    Sizes are exchanged first; every rank pads to the largest size, `all_gather`s, and the
    padding is cut off. Identity without an initialised process group.

    Args:
        x: [n_r, ...] this rank's rows (n_r may be 0 and differ per rank; trailing dims equal).

    Returns:
        [sum_r n_r, ...] the rows of rank 0, then rank 1, ...; same dtype and device as `x`.
    """
    if not dist.is_initialized():
        return x
    world = torch.distributed.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes_r = [int(s) for s in sizes]
    max_n = max(sizes_r)
    padded = x.new_zeros((max_n, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes_r)], dim=0)


# ----------------------------------------------------------------------------------------------
# Images


def eval_transform(image: Image.Image, crop_size: int = 224, resize_size: int | None = None) -> Tensor:
    """Classification eval transform (reference `make_classification_eval_transform`).

    Converts to RGB (grayscale is replicated), resizes the shorter side to `resize_size`
    (default round(crop_size * 256 / 224)) with bicubic resampling, centre-crops
    `crop_size` x `crop_size`, scales to [0, 1] and normalises with the ImageNet mean/std.

    Args:
        image: a PIL image of any mode and size.
        crop_size: output side in pixels.
        resize_size: shorter side before the crop, >= crop_size.

    Returns:
        [3, crop_size, crop_size] fp32.

    Raises:
        ValueError: resize_size < crop_size.
    """
    if resize_size is None:
        resize_size = int(round(crop_size * 256 / 224))
    if resize_size < crop_size:
        raise ValueError(f"resize_size {resize_size} must be >= crop_size {crop_size}")
    image = to_rgb(image)
    w, h = image.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop_size, round(w * scale)), max(crop_size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - crop_size) // 2, (new_h - crop_size) // 2
    image = image.crop((left, top, left + crop_size, top + crop_size))
    x_HWC = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div_(255.0)
    return normalise(x_HWC.permute(2, 0, 1))


def open_image(path_or_bytes: str | Path | bytes) -> Image.Image:
    """A fully decoded, 8-bit, upright RGB image from a path or encoded bytes
    (:func:`dvtrain.data.images.open_rgb`: EXIF orientation applied, 16-bit scaled).

    Raises:
        ValueError: the file does not exist or does not decode as an image.
    """
    return open_rgb(path_or_bytes)


class MDSEvalSet(torch.utils.data.Dataset):
    """A local MDS directory (`dvtrain data convert` output) as (image tensor, label) pairs,
    restricted to this rank's strided share `range(rank, N, world)`.

    Args:
        path: directory with streaming's `index.json`.
        crop_size, resize_size: see `eval_transform`.
        rank, world: the shard to read (default: torch.distributed's, or 0 / 1).
        limit: read only the first `limit` samples of the whole set (before sharding).

    Raises:
        ValueError: `path` is not a local MDS directory, or lacks the `image`/`label` columns.
    """

    def __init__(
        self,
        path: str | Path,
        crop_size: int = 224,
        resize_size: int | None = None,
        rank: int | None = None,
        world: int | None = None,
        limit: int | None = None,
    ) -> None:
        path = Path(path)
        if not (path / "index.json").is_file():
            raise ValueError(
                f"{path} is not an MDS dataset directory (no index.json); create one with "
                f"`dvtrain data convert SRC {path}`"
            )
        from streaming import LocalDataset

        self.data = LocalDataset(str(path))
        if len(self.data) and not {"image", "label"} <= set(self.data[0]):
            raise ValueError(f"{path}: MDS samples need columns 'image' and 'label', found {sorted(self.data[0])}")
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world_size() if world is None else world
        total = len(self.data) if limit is None else min(limit, len(self.data))
        self.total = total
        self.indices = range(self.rank, total, self.world)
        self.crop_size = crop_size
        self.resize_size = resize_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        sample = self.data[self.indices[i]]
        image = open_image(sample["image"])
        return eval_transform(image, self.crop_size, self.resize_size), int(sample["label"])


def make_eval_loader(
    path: str | Path,
    batch_size: int = 64,
    crop_size: int = 224,
    resize_size: int | None = None,
    num_workers: int = 0,
    limit: int | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader over this rank's share of a local MDS eval set (order kept, no drop_last).

    Args:
        path: MDS directory. batch_size: images per batch. crop_size/resize_size: see
        `eval_transform`. num_workers: DataLoader workers. limit: first `limit` samples only.

    Returns:
        DataLoader yielding (images [B, 3, crop, crop] fp32, labels [B] int64).
    """
    ds = MDSEvalSet(path, crop_size=crop_size, resize_size=resize_size, limit=limit)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


# ----------------------------------------------------------------------------------------------
# Feature extraction


@dataclass
class Features:
    """Frozen features of one data set.

    Attributes:
        cls_NLD: [N, L, D] fp32 normalised CLS tokens of the last L blocks (L-1 = final block,
            equal to `forward_features(x)["x_norm_clstoken"]`).
        patch_mean_ND: [N, D] fp32 mean of the final block's normalised patch tokens.
        labels_N: [N] int64.
    """

    cls_NLD: Tensor
    patch_mean_ND: Tensor
    labels_N: Tensor

    @property
    def cls_ND(self) -> Tensor:
        """[N, D] the final block's normalised CLS token (what k-NN uses)."""
        return self.cls_NLD[:, -1]

    def __len__(self) -> int:
        return self.labels_N.shape[0]


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(images [B, 3, H, W], labels [B] int64) from a tuple/list or a dict batch.

    Dict keys accepted: "image"/"images" and "label"/"labels".

    Raises:
        ValueError: neither form.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    elif isinstance(batch, dict):
        images = batch.get("images", batch.get("image"))
        labels = batch.get("labels", batch.get("label"))
    else:
        images = labels = None
    if not isinstance(images, Tensor) or labels is None:
        raise ValueError(
            "an eval batch must be (images, labels) or a dict with 'images'/'image' and 'labels'/'label'; "
            f"got {type(batch).__name__}"
        )
    return images, torch.as_tensor(labels, dtype=torch.int64)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable[Any],
    n_last_blocks: int = 1,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    gather: bool = True,
) -> Features:
    """Run a frozen backbone over a data source once and collect CLS / pooled patch features.

    Reference: dinov2/eval/utils.py `ModelWithIntermediateLayers` (get_intermediate_layers with
    return_class_token=True, norm=True) and `extract_features`.

    Args:
        backbone: a DinoVisionTransformer (anything with `get_intermediate_layers`); put in eval
            mode for the pass and restored afterwards.
        batches: iterable of (images, labels) or dict batches (see `split_batch`).
        n_last_blocks: L, how many final blocks' CLS tokens to keep (1 for k-NN, 4 for the
            linear protocol).
        device: where the backbone runs (default: the device of its first parameter).
        autocast_dtype: e.g. torch.bfloat16 to run under autocast on CUDA; None = full precision.
        gather: when torch.distributed is initialised, gather all ranks' features
            (`all_gather_uneven`) so every rank returns the full set in rank-concatenated order.

    Returns:
        Features on the CPU (fp32 / int64).

    Raises:
        ValueError: `n_last_blocks` outside [1, depth], or a malformed batch.
    """
    depth = len(getattr(backbone, "blocks", []))
    if not 1 <= n_last_blocks <= max(depth, 1):
        raise ValueError(f"n_last_blocks must be in [1, {depth}] (the backbone depth), got {n_last_blocks}")
    if device is None:
        device = next(backbone.parameters()).device
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    cls_list, patch_list, label_list = [], [], []
    try:
        for batch in batches:
            images, labels = split_batch(batch)
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outs = backbone.get_intermediate_layers(images, n=n_last_blocks, return_class_token=True, norm=True)
            cls_list.append(torch.stack([cls.float() for _, cls in outs], dim=1).cpu())
            patch_list.append(outs[-1][0].float().mean(dim=1).cpu())
            label_list.append(labels.cpu())
    finally:
        backbone.train(was_training)
    width = getattr(backbone, "embed_dim", 0)
    feats = Features(
        cls_NLD=torch.cat(cls_list) if cls_list else torch.zeros(0, n_last_blocks, width),
        patch_mean_ND=torch.cat(patch_list) if patch_list else torch.zeros(0, width),
        labels_N=torch.cat(label_list) if label_list else torch.zeros(0, dtype=torch.int64),
    )
    if gather and dist.is_initialized():
        feats = Features(*(_gather_via(t, device) for t in (feats.cls_NLD, feats.patch_mean_ND, feats.labels_N)))
    return feats


def _gather_via(x: Tensor, device: torch.device) -> Tensor:
    """all_gather_uneven through `device` (NCCL needs CUDA tensors), result back on the CPU."""
    return all_gather_uneven(x.to(device)).cpu()


def iter_batches(images_NCHW: Tensor, labels_N: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches over in-memory tensors, in order. For tests and small sets."""
    for start in range(0, images_NCHW.shape[0], batch_size):
        yield images_NCHW[start : start + batch_size], labels_N[start : start + batch_size]


def as_batches(data: Any, batch_size: int) -> tuple[Iterable[Any], bool]:
    """Normalise an eval data argument to batches.

    Args:
        data: a pair of tensors (images [N, 3, H, W], labels [N]) holding the whole set, or an
            iterable of batches (a DataLoader, e.g. `make_eval_loader`) holding this rank's share.
        batch_size: batch size for the tensor form.

    Returns:
        (iterable of (images, labels) batches, is_rank_share): False for tensors, True otherwise.

    Raises:
        ValueError: a tensor pair of the wrong shapes.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        images, labels = data
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                "tensor data must be (images [N, 3, H, W], labels [N]); "
                f"got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        return iter_batches(images, labels, batch_size), False
    return data, True


__all__ = [
    "Features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MDSEvalSet",
    "all_gather_uneven",
    "as_batches",
    "eval_transform",
    "extract_features",
    "iter_batches",
    "make_eval_loader",
    "open_image",
    "split_batch",
]
