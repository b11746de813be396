"""Linear probes on frozen features: a grid of heads trained together on cached features.

Reference: facebookresearch/dinov2 `dinov2/eval/linear.py`. Same protocol pieces:
- input of a head (`create_linear_input`): the CLS tokens of the last n blocks (n in {1, 4},
  oldest first, each after the final norm), optionally followed by the average of the last
  block's patch tokens;
- head `Linear(in_dim, C)`, weight ~ N(0, 0.01), bias 0;
- SGD momentum 0.9, no weight decay, lr = base_lr * batch_size / 256, cosine annealing to 0 over
  all iterations (`CosineAnnealingLR`, stepped after every optimiser step);
- the default base-lr grid 1e-5 ... 0.1 (13 values); every (n, avgpool, lr) combination trained
  at once, the best chosen by top-1 on the validation set, accuracy reported per configuration.

Deliberate difference: the reference runs the frozen backbone on freshly augmented images
(random-resized crop + flip) at every step; here features are extracted once from the
eval-transformed images and the heads train on that cache for `epochs` passes. This makes
a full grid cheap (one backbone pass) at the price of no augmentation.

Heads with the same input are stacked into one batched weight [G, in_dim, C] and updated with a
vectorised SGD whose arithmetic equals `torch.optim.SGD(momentum=0.9)` (tested).

Shape legend: N samples, L blocks, D width, I head input width, C classes, G heads per input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.eval.features import Features, as_batches, extract_features

DEFAULT_LEARNING_RATES: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_N_LAST_BLOCKS: tuple[int, ...] = (1, 4)
MOMENTUM = 0.9
INIT_STD = 0.01


@dataclass(frozen=True)
class ProbeConfig:
    """One linear head of the grid.

    Attributes:
        n_last_blocks: CLS tokens of this many final blocks are concatenated.
        avgpool: also append the mean of the last block's patch tokens.
        base_lr: learning rate before the batch-size scaling (lr = base_lr * batch / 256).
    """

    n_last_blocks: int
    avgpool: bool
    base_lr: float

    @property
    def name(self) -> str:
        """E.g. 'blocks4_avgpool_lr0.001' / 'blocks1_cls_lr1e-05'."""
        return f"blocks{self.n_last_blocks}_{'avgpool' if self.avgpool else 'cls'}_lr{self.base_lr:g}"


def probe_configs(
    n_last_blocks_list: Sequence[int] = DEFAULT_N_LAST_BLOCKS,
    avgpool_options: Sequence[bool] = (False, True),
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
) -> list[ProbeConfig]:
    """The grid in the reference's order: for n, for avgpool, for lr.

    Reference: dinov2/eval/linear.py `setup_linear_classifiers`.

    Args:
        n_last_blocks_list: block counts (each >= 1). avgpool_options: subset of (False, True).
        learning_rates: base learning rates (each > 0).

    Returns:
        len(n) * len(avgpool) * len(lr) configurations, no duplicates.

    Raises:
        ValueError: an empty list, n < 1, lr <= 0, or duplicates.
    """
    if not n_last_blocks_list or not avgpool_options or not learning_rates:
        raise ValueError("n_last_blocks_list, avgpool_options and learning_rates must all be non-empty")
    if min(n_last_blocks_list) < 1:
        raise ValueError(f"n_last_blocks values must be >= 1, got {list(n_last_blocks_list)}")
    if min(learning_rates) <= 0:
        raise ValueError(f"learning rates must be > 0, got {list(learning_rates)}")
    configs = [
        ProbeConfig(int(n), bool(a), float(lr))
        for n in n_last_blocks_list
        for a in avgpool_options
        for lr in learning_rates
    ]
    if len(set(configs)) != len(configs):
        raise ValueError("the probe grid has duplicate entries; list each block count, pooling option and lr once")
    return configs


def linear_input(feats: Features, n_last_blocks: int, avgpool: bool) -> Tensor:
    """Head input from cached features (reference `create_linear_input`).

    Args:
        feats: Features with cls_NLD [N, L, D], patch_mean_ND [N, D].
        n_last_blocks: n <= L. avgpool: append the pooled patch tokens.

    Returns:
        [N, n * D (+ D)] fp32: CLS of blocks L-n .. L-1 (oldest first), then the pooled patches.

    Raises:
        ValueError: n > L (extract with more blocks).
    """
    L = feats.cls_NLD.shape[1]
    if n_last_blocks > L:
        raise ValueError(
            f"n_last_blocks={n_last_blocks} but the features hold only {L} blocks; "
            f"extract with n_last_blocks>={n_last_blocks}"
        )
    x = feats.cls_NLD[:, L - n_last_blocks :].reshape(feats.cls_NLD.shape[0], -1)
    if avgpool:
        x = torch.cat((x, feats.patch_mean_ND), dim=1)
    return x.float()


def cosine_lr(base_lr: Tensor, step: int, total_steps: int) -> Tensor:
    """`CosineAnnealingLR(T_max=total_steps, eta_min=0)` in closed form at `step` (0-based)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _topk_hits(logits_GNC: Tensor, labels_N: Tensor, k: int) -> Tensor:
    """[G] number of samples whose label is among each head's top-k (ties: lower class first)."""
    k = min(k, logits_GNC.shape[-1])
    order = logits_GNC.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return (order == labels_N[None, :, None]).any(dim=-1).sum(dim=1)


@torch.no_grad()
def _accuracies(W_GIC: Tensor, b_GC: Tensor, x_NI: Tensor, y_N: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    hits1 = torch.zeros(W_GIC.shape[0], dtype=torch.int64, device=W_GIC.device)
    hits5 = torch.zeros_like(hits1)
    for s in range(0, x_NI.shape[0], batch_size):
        xb, yb = x_NI[s : s + batch_size], y_N[s : s + batch_size]
        logits = torch.einsum("ni,gic->gnc", xb, W_GIC) + b_GC[:, None]
        hits1 += _topk_hits(logits, yb, 1)
        hits5 += _topk_hits(logits, yb, 5)
    n = max(x_NI.shape[0], 1)
    return 100.0 * hits1.double().cpu() / n, 100.0 * hits5.double().cpu() / n


def fit_linear_heads(
    x_NI: Tensor,
    y_N: Tensor,
    lrs_G: Tensor,
    init_W_GCI: Tensor,
    perms: Sequence[Tensor],
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Train G linear heads on the same inputs with SGD momentum 0.9 and a cosine schedule.

    Arithmetic of `torch.optim.SGD(lr, momentum=0.9, dampening=0, weight_decay=0)` +
    `CosineAnnealingLR(T_max=total steps, eta_min=0)` for each head, on each head's mean
    cross-entropy; all heads in one batched matmul.

    Args:
        x_NI: [N, I] fp32 inputs (on the training device). y_N: [N] int64 labels.
        lrs_G: [G] learning rates (already batch-size scaled).
        init_W_GCI: [G, C, I] initial weights (torch.nn.Linear layout); biases start at 0.
        perms: one permutation of range(N) per epoch (batches are consecutive slices).
        batch_size: samples per step (the last batch of an epoch may be smaller).

    Returns:
        (W_GIC [G, I, C], b_GC [G, C]) fp32 detached, on the device of `x_NI`.
    """
    device = x_NI.device
    N, G, C = x_NI.shape[0], init_W_GCI.shape[0], init_W_GCI.shape[1]
    total_steps = len(perms) * math.ceil(N / batch_size)
    W_GIC = init_W_GCI.transpose(1, 2).contiguous().to(device).requires_grad_(True)
    b_GC = torch.zeros(G, C, device=device, requires_grad=True)
    mom_W, mom_b = torch.zeros_like(W_GIC), torch.zeros_like(b_GC)
    lrs_G = lrs_G.to(device)
    step = 0
    for perm in perms:
        for s in range(0, N, batch_size):
            idx = perm[s : s + batch_size].to(device)
            xb, yb = x_NI[idx], y_N[idx]
            with torch.enable_grad():  # callers may run under no_grad
                logits_GBC = torch.einsum("bi,gic->gbc", xb, W_GIC) + b_GC[:, None]
                # sum over heads of each head's mean cross-entropy: independent gradients per head
                loss = F.cross_entropy(logits_GBC.reshape(-1, C), yb.repeat(G), reduction="sum") / xb.shape[0]
            gW, gb = torch.autograd.grad(loss, (W_GIC, b_GC))
            lr_G = cosine_lr(lrs_G, step, total_steps)
            with torch.no_grad():  # buf = m * buf + g; p -= lr * buf
                mom_W.mul_(MOMENTUM).add_(gW)
                mom_b.mul_(MOMENTUM).add_(gb)
                W_GIC.sub_(lr_G[:, None, None] * mom_W)
                b_GC.sub_(lr_G[:, None] * mom_b)
            step += 1
    return W_GIC.detach(), b_GC.detach()


def train_linear_probes(
    train: Features,
    val: Features,
    configs: Sequence[ProbeConfig] | None = None,
    epochs: int = 10,
    batch_size: int = 256,
    num_classes: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Train every head of the grid on cached features and evaluate them on `val`.

    Reference: dinov2/eval/linear.py (`setup_linear_classifiers`, `eval_linear`,
    `evaluate_linear_classifiers`); the differences are listed in the module docstring.

    Args:
        train, val: Features (`extract_features(..., n_last_blocks=max n)`).
        configs: the grid (default `probe_configs()`; configurations whose n exceeds the
            extracted blocks are an error).
        epochs: passes over the shuffled train features (drop_last=False).
        batch_size: samples per step; also the lr scaling (lr = base_lr * batch_size / 256).
        num_classes: C (default max label + 1 over train and val).
        seed: shuffling and head initialisation.
        device: where the heads train.

    Returns:
        dict: `configs` {name: {"n_last_blocks", "avgpool", "base_lr", "lr", "top1", "top5"}}
        (val accuracy in percent, top5 = top-min(5, C)), `best` {"name", "top1", "top5"} (highest
        val top-1, ties: first in grid order), `num_train`, `num_val`, `num_classes`, `epochs`,
        `batch_size`, `steps`.

    Raises:
        ValueError: empty sets, bad labels, epochs/batch_size < 1, a config needing more blocks.
    """
    configs = list(configs) if configs is not None else probe_configs()
    if not configs:
        raise ValueError("configs is empty: give at least one ProbeConfig")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"linear probes need train and val samples (got {len(train)} and {len(val)})")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    for name, f in (("train", train), ("val", val)):
        if f.labels_N.dtype.is_floating_point or int(f.labels_N.min()) < 0:
            raise ValueError(f"{name} labels must be integer class ids >= 0")
    max_label = max(int(train.labels_N.max()), int(val.labels_N.max()))
    C = max_label + 1 if num_classes is None else num_classes
    if max_label >= C:
        raise ValueError(f"num_classes={C} but a label {max_label} occurs")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    N = len(train)
    steps_per_epoch = math.ceil(N / batch_size)
    total_steps = epochs * steps_per_epoch
    perms = [torch.randperm(N, generator=gen) for _ in range(epochs)]
    y_train = train.labels_N.to(device)
    y_val = val.labels_N.to(device)

    groups: dict[tuple[int, bool], list[ProbeConfig]] = {}
    for c in configs:
        groups.setdefault((c.n_last_blocks, c.avgpool), []).append(c)
    results: dict[str, dict] = {}
    for (n, avgpool), group in groups.items():
        x_train = linear_input(train, n, avgpool).to(device)
        x_val = linear_input(val, n, avgpool).to(device)
        W0_GCI = torch.randn(len(group), C, x_train.shape[1], generator=gen) * INIT_STD
        lrs_G = torch.tensor([c.base_lr * batch_size / 256.0 for c in group], dtype=torch.float32)
        W_GIC, b_GC = fit_linear_heads(x_train, y_train, lrs_G, W0_GCI, perms, batch_size)
        top1, top5 = _accuracies(W_GIC, b_GC, x_val, y_val, 4096)
        for g, c in enumerate(group):
            results[c.name] = {
                "n_last_blocks": c.n_last_blocks,
                "avgpool": c.avgpool,
                "base_lr": c.base_lr,
                "lr": c.base_lr * batch_size / 256.0,
                "top1": float(top1[g]),
                "top5": float(top5[g]),
            }
    ordered = {c.name: results[c.name] for c in configs}
    best_name = max(ordered, key=lambda k: ordered[k]["top1"])  # max keeps the first of equals
    return {
        "configs": ordered,
        "best": {"name": best_name, "top1": ordered[best_name]["top1"], "top5": ordered[best_name]["top5"]},
        "num_train": len(train),
        "num_val": len(val),
        "num_classes": C,
        "top5_n": min(5, C),
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": total_steps,
    }


@torch.no_grad()
def linear_eval_backbone(
    backbone: nn.Module,
    train: Any,
    val: Any,
    n_last_blocks_list: Sequence[int] = DEFAULT_N_LAST_BLOCKS,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    epochs: int = 10,
    probe_batch_size: int = 256,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """Linear-probe accuracy of a frozen backbone: one feature pass, then the whole grid.

    Args:
        backbone: a DinoVisionTransformer.
        train, val: tensor pairs (images [N, 3, H, W], labels [N]) or iterables of batches
            (e.g. `make_eval_loader`); under torch.distributed an iterable is this rank's share
            and features are gathered, after which every rank trains the same heads.
        n_last_blocks_list: block counts of the grid; values above the backbone depth are
            dropped (a note is added). learning_rates: base lr grid.
        epochs, num_classes, seed: see `train_linear_probes`; probe_batch_size is its
            `batch_size` (SGD step size and lr scaling).
        device: backbone and head device (default the backbone's). autocast_dtype: see
            `extract_features`. batch_size: images per forward pass for tensor inputs.

    Returns:
        The dict of `train_linear_probes`, plus `notes`.

    Raises:
        ValueError: no usable block count, and those of `train_linear_probes`.
    """
    depth = len(backbone.blocks)
    usable = [n for n in n_last_blocks_list if n <= depth]
    notes = [f"n_last_blocks={n} skipped: the backbone has only {depth} blocks" for n in n_last_blocks_list if n > depth]
    if not usable:
        raise ValueError(f"no n_last_blocks in {list(n_last_blocks_list)} fits a backbone of depth {depth}")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    train_batches, train_is_share = as_batches(train, batch_size)
    val_batches, val_is_share = as_batches(val, batch_size)
    L = max(usable)
    train_f = extract_features(backbone, train_batches, L, device, autocast_dtype, gather=train_is_share)
    val_f = extract_features(backbone, val_batches, L, device, autocast_dtype, gather=val_is_share)
    out = train_linear_probes(
        train_f,
        val_f,
        probe_configs(usable, (False, True), learning_rates),
        epochs=epochs,
        batch_size=probe_batch_size,
        num_classes=num_classes,
        seed=seed,
        device=device,
    )
    out["notes"] = notes
    return out


__all__ = [
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_N_LAST_BLOCKS",
    "ProbeConfig",
    "fit_linear_heads",
    "linear_eval_backbone",
    "linear_input",
    "probe_configs",
    "train_linear_probes",
]
