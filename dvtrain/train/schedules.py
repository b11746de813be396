"""Per-iteration schedules: learning rate, weight decay, teacher momentum and temperature.

Follows ``dinov2/utils/utils.py::CosineScheduler`` and ``dinov2/train/train.py::build_schedulers``.
Every schedule is a precomputed numpy array indexed by the optimizer iteration; indexing at or past
the end returns the final value, so a run resumed at iteration k reads ``schedule[k]`` and runs past
the planned length keep the last value. "Epoch" is a unit of ``epoch_length`` iterations (1250 in
the reference), independent of the dataset size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Schedule", "cosine_schedule", "Schedules", "build_schedules", "scale_lr"]


class Schedule:
    """A per-iteration schedule with a final value for every index past its end.

    Args:
        values: float64 numpy array [T] of the first T iterations.
        final_value: value for every iteration >= T.
    """

    def __init__(self, values: np.ndarray, final_value: float) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.final_value = float(final_value)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, it: int) -> float:
        """Value at iteration ``it`` (>= 0); ``final_value`` for ``it >= len``.

        Raises:
            ValueError: negative iteration.
        """
        it = int(it)
        if it < 0:
            raise ValueError(f"schedule iteration must be >= 0, got {it}")
        return self.final_value if it >= len(self.values) else float(self.values[it])

    def __repr__(self) -> str:
        first = float(self.values[0]) if len(self.values) else self.final_value
        return f"Schedule(len={len(self)}, first={first:.6g}, final={self.final_value:.6g})"


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> Schedule:
    """Freeze (zeros), linear warmup, then half-cosine from ``base_value`` to ``final_value``.

    Same values as ``dinov2/utils/utils.py::CosineScheduler``: warmup is
    ``linspace(start_warmup_value, base_value, warmup_iters)`` (both ends included), the cosine part
    is ``final + 0.5 (base - final)(1 + cos(pi i / n))`` for i = 0..n-1,
    n = total - warmup - freeze. A linear warmup-then-constant schedule is ``base == final`` with
    ``warmup_iters == total_iters``.

    Args:
        base_value: value after warmup (at the cosine start).
        final_value: value the cosine approaches, and the value past the end.
        total_iters: schedule length in iterations.
        warmup_iters: linear warmup length.
        start_warmup_value: first warmup value.
        freeze_iters: leading iterations at 0.

    Returns:
        :class:`Schedule` of length ``total_iters``.

    Raises:
        ValueError: negative lengths or ``warmup_iters + freeze_iters > total_iters``.
    """
    if min(total_iters, warmup_iters, freeze_iters) < 0:
        raise ValueError(
            f"schedule lengths must be >= 0, got total={total_iters}, warmup={warmup_iters}, freeze={freeze_iters}"
        )
    if warmup_iters + freeze_iters > total_iters:
        raise ValueError(
            f"warmup ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed the schedule length {total_iters}"
        )
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n = total_iters - warmup_iters - freeze_iters
    iters = np.arange(n)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(n, 1)))
    values = np.concatenate((freeze, warmup, cosine))
    assert len(values) == total_iters
    return Schedule(values, final_value)


def scale_lr(base_lr: float, global_batch_size: int, rule: Literal["sqrt", "linear", "none"] = "sqrt",
             reference_batch_size: int = 1024) -> float:
    """Scale the base learning rate with the global batch size.

    ``sqrt`` (DINOv2): ``base_lr * sqrt(B / 1024)``; ``linear``: ``base_lr * B / 1024``; ``none``: ``base_lr``.

    Args:
        base_lr: learning rate at the reference batch size.
        global_batch_size: images per optimizer step over all ranks (with gradient accumulation).
        rule: ``"sqrt"``, ``"linear"`` or ``"none"``.
        reference_batch_size: batch size of ``base_lr`` (1024).

    Returns:
        scaled learning rate.

    Raises:
        ValueError: unknown rule or non-positive batch sizes.
    """
    if global_batch_size <= 0 or reference_batch_size <= 0:
        raise ValueError(
            f"batch sizes must be > 0, got global_batch_size={global_batch_size}, reference={reference_batch_size}"
        )
    ratio = global_batch_size / reference_batch_size
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "linear":
        return base_lr * ratio
    if rule == "none":
        return base_lr
    raise ValueError(f"lr scaling rule must be 'sqrt', 'linear' or 'none', got {rule!r}")


@dataclass(frozen=True)
class Schedules:
    """The five per-iteration schedules of a DINOv2 run (``dinov2/train/train.py::build_schedulers``)."""

    lr: Schedule
    wd: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    last_layer_lr: Schedule
    backbone_lr_scale: Schedule | None = None  # None = no backbone freeze (always 1)

    def at(self, it: int) -> dict[str, float]:
        """All values at iteration ``it``: keys lr, wd, momentum, teacher_temp, last_layer_lr
        (and backbone_lr_scale when the backbone is frozen at the start)."""
        out = {
            "lr": self.lr[it],
            "wd": self.wd[it],
            "momentum": self.momentum[it],
            "teacher_temp": self.teacher_temp[it],
            "last_layer_lr": self.last_layer_lr[it],
        }
        if self.backbone_lr_scale is not None:
            out["backbone_lr_scale"] = self.backbone_lr_scale[it]
        return out


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    epochs: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    teacher_temp: float,
    warmup_teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    freeze_last_layer_epochs: float,
    epoch_length: int = 1250,
    freeze_backbone_iters: int = 0,
    backbone_warmup_iters: int = 0,
) -> Schedules:
    """Build the schedules as the reference does.

    Args:
        lr: peak learning rate, already scaled (see :func:`scale_lr`).
        min_lr: final learning rate (1e-6).
        epochs: run length in epochs of ``epoch_length`` iterations.
        warmup_epochs: lr warmup from 0.
        weight_decay: initial weight decay (0.04); cosine to ``weight_decay_end`` (0.4 / 0.2).
        weight_decay_end: final weight decay.
        momentum_teacher: initial EMA momentum (0.992 / 0.994); cosine to ``final_momentum_teacher`` (1.0).
        final_momentum_teacher: final EMA momentum.
        teacher_temp: teacher temperature after warmup (0.07).
        warmup_teacher_temp: first teacher temperature (0.04).
        warmup_teacher_temp_epochs: linear temperature warmup length (30).
        freeze_last_layer_epochs: epochs during which the heads' last layer has lr 0 (1).
        epoch_length: iterations per epoch (1250).
        freeze_backbone_iters: leading iterations with backbone lr factor 0 (dvtrain, continued pretraining
            with fresh heads); then ``backbone_warmup_iters`` of linear warmup of that factor to 1.

    Returns:
        :class:`Schedules`.

    Raises:
        ValueError: non-positive lengths or warmups longer than the run.
    """
    if epoch_length <= 0 or epochs <= 0:
        raise ValueError(f"epochs and epoch_length must be > 0, got epochs={epochs}, epoch_length={epoch_length}")
    if freeze_last_layer_epochs < 0:
        raise ValueError(f"freeze_last_layer_epochs must be >= 0, got {freeze_last_layer_epochs}")
    def iters(num_epochs: float) -> int:
        return int(round(num_epochs * epoch_length))

    total = iters(epochs)
    lr_kwargs = dict(
        base_value=lr, final_value=min_lr, total_iters=total, warmup_iters=iters(warmup_epochs),
        start_warmup_value=0.0,
    )
    lr_schedule = cosine_schedule(**lr_kwargs)
    last_layer = cosine_schedule(**lr_kwargs)
    last_layer.values[: iters(freeze_last_layer_epochs)] = 0.0
    temp_iters = iters(warmup_teacher_temp_epochs)
    return Schedules(
        lr=lr_schedule,
        wd=cosine_schedule(weight_decay, weight_decay_end, total),
        momentum=cosine_schedule(momentum_teacher, final_momentum_teacher, total),
        teacher_temp=cosine_schedule(
            teacher_temp, teacher_temp, temp_iters, warmup_iters=temp_iters, start_warmup_value=warmup_teacher_temp
        ),
        last_layer_lr=last_layer,
        backbone_lr_scale=cosine_schedule(
            1.0, 1.0, freeze_backbone_iters + backbone_warmup_iters, warmup_iters=backbone_warmup_iters,
            freeze_iters=freeze_backbone_iters,
        ) if freeze_backbone_iters > 0 else None,
    )
