"""Weighted k-nearest-neighbour classification on frozen features (the DINOv2 k-NN protocol).

Reference: facebookresearch/dinov2 `dinov2/eval/knn.py` (`KnnModule`): L2-normalised features,
cosine similarity against the whole train bank, the top-k neighbours, weights
softmax(sim / T) with T = 0.07, class votes = sum of the weights of the neighbours of that
class, top-1 and top-5 accuracy per k, k in {10, 20, 100, 200}.

The reference computes one softmax over max(k) neighbours and sums its first k entries; this
module takes the softmax over the first k. Both differ by one positive factor per query, so
every ranking (and hence every accuracy) is identical.

Edge cases, defined here (the reference leaves them to torch.topk):
- k larger than the train set: clamped to N; the result reports `k_effective` and a note.
- fewer than 5 classes: "top5" is top-min(5, C); the result reports `top5_n` and a note.
- ties between neighbours (equal similarity): the lower train index ranks first.
- ties between classes (equal votes): the lower class id ranks first.
- a class that got no vote (no neighbour of that class among the k) is never predicted, not
  even to fill the top-5: a query with 2 voted classes has 2 candidates for its top-5.
- an empty class (no train sample, or no val sample): it cannot be predicted; val samples of
  a class without train samples always count as misses. Listed in `classes_without_train`.

Shape legend: N train bank size, Q queries (val samples), D feature width, K neighbours,
C classes, P predictions per query (min(5, C)).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain import dist
from dvtrain.eval.features import all_gather_uneven, as_batches, extract_features

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
# similarity-matrix elements per query chunk: 2**24 fp32 = 64 MiB
_CHUNK_ELEMENTS = 1 << 24


def l2_normalize(x_ND: Tensor) -> Tensor:
    """Row-wise L2 normalisation in fp32 (reference `ModelWithNormalize`).

    Args:
        x_ND: [N, D] features, any float dtype.

    Returns:
        [N, D] fp32, each row of unit norm (an all-zero row stays zero).
    """
    return F.normalize(x_ND.float(), p=2.0, dim=1)


def topk_neighbors(sim_QN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most similar train samples per query, deterministic under ties.

    Ordering: descending similarity; among equal similarities the lower train index first,
    also at the k-th position (which of several equally similar samples gets in).

    Args:
        sim_QN: [Q, N] similarities (fp32).
        k: number of neighbours, 1 <= k <= N.

    Returns:
        (sims_QK [Q, k] fp32 descending, idx_QK [Q, k] int64 train indices).
    """
    assert 1 <= k <= sim_QN.shape[1], (k, sim_QN.shape)
    vals_QK, idx_QK = sim_QN.topk(k, dim=1, largest=True, sorted=True)
    thresh_Q1 = vals_QK[:, -1:]
    # rows where more samples than fit share the k-th value: selection among them is ambiguous
    ambiguous_Q = (sim_QN >= thresh_Q1).sum(dim=1) > k
    if ambiguous_Q.any():
        rows = ambiguous_Q.nonzero().squeeze(1)
        sim_RN = sim_QN[rows]
        thr_R1 = thresh_Q1[rows]
        above_RN = sim_RN > thr_R1
        tied_RN = sim_RN == thr_R1
        need_R1 = k - above_RN.sum(dim=1, keepdim=True)
        keep_RN = above_RN | (tied_RN & (tied_RN.cumsum(dim=1) <= need_R1))
        # nonzero is row-major: per row the kept indices come in ascending order
        idx_RK = keep_RN.nonzero()[:, 1].view(len(rows), k)
        vals_QK = vals_QK.clone()
        idx_QK = idx_QK.clone()
        vals_QK[rows] = sim_RN.gather(1, idx_RK)
        idx_QK[rows] = idx_RK
    # canonical order inside the selection: index ascending, then stable sort by value descending
    idx_sorted_QK, perm_QK = idx_QK.sort(dim=1)
    vals_QK = vals_QK.gather(1, perm_QK)
    vals_QK, perm_QK = vals_QK.sort(dim=1, descending=True, stable=True)
    return vals_QK, idx_sorted_QK.gather(1, perm_QK)


def knn_votes(sims_QK: Tensor, labels_QK: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class votes from the k neighbours: sum over neighbours of softmax(sim / T) per class.

    Reference: dinov2/eval/knn.py `KnnModule.forward`.

    Args:
        sims_QK: [Q, K] cosine similarities of the neighbours.
        labels_QK: [Q, K] int64 class ids of the neighbours, in [0, C).
        num_classes: C.
        temperature: T > 0.

    Returns:
        votes_QC [Q, C] fp32; each row sums to 1, zero for classes without a neighbour.
    """
    weights_QK = torch.softmax(sims_QK.float() / temperature, dim=1)
    votes_QC = weights_QK.new_zeros(sims_QK.shape[0], num_classes)
    return votes_QC.scatter_add_(1, labels_QK, weights_QK)


def rank_classes(votes_QC: Tensor, num_predictions: int) -> Tensor:
    """The `num_predictions` best classes per query; -1 where fewer classes got a vote.

    Ties: equal votes rank the lower class id first (stable sort).

    Args:
        votes_QC: [Q, C] non-negative votes.
        num_predictions: P <= C.

    Returns:
        pred_QP [Q, P] int64 class ids in rank order, -1 for slots without a voted class.
    """
    vals_QC, order_QC = votes_QC.sort(dim=1, descending=True, stable=True)
    pred_QP = order_QC[:, :num_predictions].clone()
    pred_QP[vals_QC[:, :num_predictions] <= 0] = -1
    return pred_QP


def _check_inputs(feats_ND: Tensor, labels_N: Tensor, name: str) -> None:
    if feats_ND.ndim != 2:
        raise ValueError(f"{name} features must be 2-D [num_samples, dim], got shape {tuple(feats_ND.shape)}")
    if labels_N.ndim != 1 or labels_N.shape[0] != feats_ND.shape[0]:
        raise ValueError(
            f"{name} labels must be 1-D with one label per feature row: got labels {tuple(labels_N.shape)} "
            f"for features {tuple(feats_ND.shape)}"
        )
    if labels_N.dtype.is_floating_point or labels_N.dtype == torch.bool:
        raise ValueError(f"{name} labels must be integer class ids, got dtype {labels_N.dtype}")
    if labels_N.numel() and int(labels_N.min()) < 0:
        raise ValueError(f"{name} labels must be >= 0, found {int(labels_N.min())}")


def _count_hits(
    bank_DN: Tensor,
    bank_labels_N: Tensor,
    query_QD: Tensor,
    query_labels_Q: Tensor,
    ks_eff: Sequence[int],
    temperature: float,
    num_classes: int,
    num_predictions: int,
    chunk_size: int,
) -> Tensor:
    """Top-1 / top-P hit counts per k over all queries, chunked. Returns [len(ks), 2] int64."""
    max_k = max(ks_eff)
    hits = torch.zeros(len(ks_eff), 2, dtype=torch.int64)
    for start in range(0, query_QD.shape[0], chunk_size):
        q_QD = query_QD[start : start + chunk_size]
        y_Q = query_labels_Q[start : start + chunk_size].to(q_QD.device)
        sims_QK, idx_QK = topk_neighbors(q_QD @ bank_DN, max_k)
        labels_QK = bank_labels_N[idx_QK]
        for i, k in enumerate(ks_eff):
            votes_QC = knn_votes(sims_QK[:, :k], labels_QK[:, :k], num_classes, temperature)
            pred_QP = rank_classes(votes_QC, num_predictions)
            match_QP = pred_QP == y_Q[:, None]
            hits[i, 0] += int(match_QP[:, 0].sum())
            hits[i, 1] += int(match_QP.any(dim=1).sum())
    return hits


@torch.no_grad()
def knn_eval_features(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    sharded: bool = False,
    chunk_size: int | None = None,
) -> dict:
    """k-NN classification accuracy of `val` against the `train` bank, for every k in `ks`.

    Reference: dinov2/eval/knn.py (`eval_knn`, `KnnModule`). Works on any features (backbone
    CLS tokens, raw pixels flattened to [N, H*W*C], ...). The computation runs on the device of
    `train_feats`, chunked over queries so that at most ~2**24 similarities live at once.

    Args:
        train_feats: [N, D] float features of the bank (normalised here; fp32 inside).
        train_labels: [N] integer class ids >= 0.
        val_feats: [Q, D] float query features.
        val_labels: [Q] integer class ids >= 0.
        ks: neighbour counts (default 10, 20, 100, 200); each k > N is clamped to N.
        temperature: T of the vote weights softmax(sim / T) (default 0.07).
        num_classes: C; default max(label) + 1 over train and val labels.
        sharded: when True and torch.distributed is initialised, the four tensors are this
            rank's shard of the data: train shards are gathered onto every rank (uneven counts
            allowed), each rank classifies its own queries, hit counts are summed. When False,
            the tensors are the complete sets (every rank computes the same result).
        chunk_size: queries per chunk (default: 2**24 // N, at least 1).

    Returns:
        dict (JSON-serialisable): `temperature`, `num_train` N, `num_val` Q, `num_classes` C,
        `top5_n` = min(5, C), `classes_without_train` (ids in [0, C) with no train sample),
        `per_k` {str(k): {"k": k, "k_effective": min(k, N), "top1": %, "top5": %}} with
        accuracies in percent of the val samples, and `notes` (clamped k, top-5 meaning).

    Raises:
        ValueError: empty train or val set, mismatched shapes or widths, non-integer or negative
            labels, labels >= num_classes, an empty `ks`, k < 1, temperature <= 0.
    """
    _check_inputs(train_feats, train_labels, "train")
    _check_inputs(val_feats, val_labels, "val")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(
            f"train and val features differ in width: {train_feats.shape[1]} vs {val_feats.shape[1]}"
        )
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive neighbour counts, got {ks}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    distributed = sharded and dist.is_initialized()
    device = train_feats.device
    bank_ND = l2_normalize(train_feats)
    bank_labels_N = train_labels.to(device=device, dtype=torch.int64)
    query_QD = l2_normalize(val_feats.to(device))
    query_labels_Q = val_labels.to(dtype=torch.int64)
    if distributed:
        bank_ND = all_gather_uneven(bank_ND)
        bank_labels_N = all_gather_uneven(bank_labels_N)
    num_train = bank_ND.shape[0]
    num_val = query_QD.shape[0]
    max_label = max(int(bank_labels_N.max()) if num_train else -1, int(query_labels_Q.max()) if num_val else -1)
    if distributed:  # queries stay sharded: total count and label range over all ranks
        num_val_t = torch.tensor([num_val], dtype=torch.int64, device=device)
        max_label_t = torch.tensor([max_label], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(num_val_t)
        torch.distributed.all_reduce(max_label_t, op=torch.distributed.ReduceOp.MAX)
        num_val, max_label = int(num_val_t), int(max_label_t)
    if num_train == 0:
        raise ValueError("the k-NN train bank is empty: give at least one train sample")
    if num_val == 0:
        raise ValueError("the k-NN val set is empty: give at least one val sample")
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"num_classes={num_classes} but a label {max_label} occurs; labels must lie in [0, C)")

    ks_eff = [min(k, num_train) for k in ks]
    num_predictions = min(5, num_classes)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // num_train)
    hits = _count_hits(
        bank_ND.T.contiguous(),
        bank_labels_N,
        query_QD,
        query_labels_Q,
        ks_eff,
        temperature,
        num_classes,
        num_predictions,
        chunk_size,
    )
    if distributed:
        hits = hits.to(device)
        torch.distributed.all_reduce(hits)
        hits = hits.cpu()

    present = torch.bincount(bank_labels_N.cpu(), minlength=num_classes) > 0
    notes = []
    for k, k_eff in zip(ks, ks_eff):
        if k_eff != k:
            notes.append(f"k={k} exceeds the train bank size {num_train}: used k={k_eff}")
    if num_predictions < 5:
        notes.append(f"only {num_classes} classes: 'top5' is top-{num_predictions} accuracy")
    return {
        "temperature": float(temperature),
        "num_train": num_train,
        "num_val": num_val,
        "num_classes": num_classes,
        "top5_n": num_predictions,
        "classes_without_train": [int(c) for c in (~present).nonzero().flatten()],
        "per_k": {
            str(k): {
                "k": k,
                "k_effective": k_eff,
                "top1": 100.0 * int(hits[i, 0]) / num_val,
                "top5": 100.0 * int(hits[i, 1]) / num_val,
            }
            for i, (k, k_eff) in enumerate(zip(ks, ks_eff))
        },
        "notes": notes,
    }


@torch.no_grad()
def knn_eval_backbone(
    backbone: nn.Module,
    train: Any,
    val: Any,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 256,
) -> dict:
    """k-NN accuracy of a frozen backbone's CLS features (the DINOv2 protocol).

    Reference: dinov2/eval/knn.py `eval_knn`. Features are `x_norm_clstoken` (the final norm's
    CLS token), L2-normalised; see `knn_eval_features` for the classifier and its edge cases.

    Args:
        backbone: a DinoVisionTransformer (eval mode during the pass, restored afterwards).
        train, val: either a pair of tensors (images [N, 3, H, W] already normalised, labels [N]
            int) holding the whole set, or an iterable of (images, labels) / dict batches such as
            `make_eval_loader(...)`. With torch.distributed initialised an iterable is taken to
            be this rank's share (no duplicates across ranks); the train bank is gathered and
            hit counts are summed over ranks.
        ks: neighbour counts (default 10, 20, 100, 200). temperature: T (default 0.07).
        num_classes: C (default max label + 1).
        device: where the backbone runs (default its parameters' device).
        autocast_dtype: autocast dtype for the forward (None = full precision).
        batch_size: batch size used when tensors are given.

    Returns:
        The dict of `knn_eval_features` (accuracies in percent under `per_k[str(k)]`).

    Raises:
        ValueError: see `knn_eval_features`, `extract_features`.
    """
    train_batches, train_sharded = as_batches(train, batch_size)
    val_batches, val_sharded = as_batches(val, batch_size)
    if train_sharded != val_sharded and dist.is_initialized():
        raise ValueError("give train and val in the same form (both tensor pairs or both loaders) under torch.distributed")
    train_f = extract_features(backbone, train_batches, 1, device, autocast_dtype, gather=False)
    val_f = extract_features(backbone, val_batches, 1, device, autocast_dtype, gather=False)
    feat_device = torch.device(device) if device is not None else next(backbone.parameters()).device
    return knn_eval_features(
        train_f.cls_ND.to(feat_device),
        train_f.labels_N,
        val_f.cls_ND,
        val_f.labels_N,
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
        sharded=train_sharded,
    )


def format_knn_results(results: dict) -> str:
    """One line per k: 'k=20 (eff 20): top-1 93.10%  top-5 99.80%'. For logs and the CLI."""
    lines = []
    for entry in results["per_k"].values():
        eff = "" if entry["k_effective"] == entry["k"] else f" (clamped to {entry['k_effective']})"
        lines.append(
            f"k={entry['k']}{eff}: top-1 {entry['top1']:.2f}%  top-{results['top5_n']} {entry['top5']:.2f}%"
        )
    return "\n".join(lines + results["notes"])


__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TEMPERATURE",
    "format_knn_results",
    "knn_eval_backbone",
    "knn_eval_features",
    "knn_votes",
    "l2_normalize",
    "rank_classes",
    "topk_neighbors",
]
