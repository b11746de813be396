"""DINO CLS-token loss and the teacher-target machinery shared with iBOT.

Follows ``dinov2/loss/dino_clstoken_loss.py`` (``DINOLoss``) with three deliberate changes:

- Sinkhorn-Knopp subtracts one global max (all-reduced MAX) of ``logits / T`` before ``exp``.
  This multiplies Q by a constant that the first normalisation removes, so the result is the
  reference's wherever the reference is finite; the reference overflows fp32 at T = 0.04 for logits
  above ~3.5. Rows / columns whose mass underflowed to exactly 0 stay 0 instead of becoming NaN.
- Centering: the batch statistics (sum, count) are accumulated by :meth:`update_center` and applied
  once by :meth:`apply_center_update` (one all-reduce of [K + 1] floats), which the training step
  calls at the optimizer-step boundary. The reference applies the previous batch's update lazily at
  the next ``softmax_center_teacher`` call; both use, at step t, the center of steps < t. With
  gradient accumulation, all micro-batches of a step are pooled as one batch. A micro-batch whose
  teacher output has a non-finite value is left out of the statistics (it never touches the center).
- The center and the pending statistics stay fp32 even when the owning model is cast with
  ``.half()`` / ``.bfloat16()`` (DeepSpeed does this).

Shapes: N teacher/student rows (samples or masked tokens), K prototypes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOLoss", "TeacherTargets", "sinkhorn_knopp", "cross_entropy_terms"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_(t: torch.Tensor, use_max: bool = False) -> torch.Tensor:
    """In-place all-reduce (SUM, or MAX) when a process group exists; identity otherwise."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if use_max else dist.ReduceOp.SUM)
    return t


def _safe_div_(q: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """q /= denom, leaving entries whose denominator is 0 at 0 (their numerators are 0 too)."""
    return q.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits_NK: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2), global over all ranks.

    Follows ``dinov2/loss/dino_clstoken_loss.py::sinkhorn_knopp_teacher``; the number of samples B is
    the all-reduced row count (equal per rank in the reference; iBOT all-reduces its masked-token
    count the same way). Collectives (when a process group exists): one MAX, then SUMs; every rank
    must call this, also with N = 0.

    Args:
        teacher_logits_NK: [N, K] teacher head outputs, any float dtype (computed in fp32).
        teacher_temp: teacher temperature T > 0.
        n_iterations: Sinkhorn iterations (3 in the reference).

    Returns:
        [N, K] fp32 assignment, each row sums to 1.

    Raises:
        ValueError: non-positive temperature or fewer than 1 iteration.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    x_NK = teacher_logits_NK.float() / teacher_temp
    num_prototypes = x_NK.shape[1]
    global_max = x_NK.max() if x_NK.numel() > 0 else x_NK.new_full((), float("-inf"))
    global_max = _all_reduce_(global_max.clone(), use_max=True)
    q_KN = torch.exp(x_NK - global_max).t()
    total_and_count = torch.stack([q_KN.sum(), q_KN.new_tensor(float(q_KN.shape[1]))])
    _all_reduce_(total_and_count)
    sum_q, num_samples = total_and_count[0], total_and_count[1]
    _safe_div_(q_KN, sum_q)
    for _ in range(n_iterations):
        # each prototype (row) gets total mass 1/K
        sum_of_rows_K1 = _all_reduce_(q_KN.sum(dim=1, keepdim=True))
        _safe_div_(q_KN, sum_of_rows_K1)
        q_KN /= num_prototypes
        # each sample (column) gets total mass 1/B
        _safe_div_(q_KN, q_KN.sum(dim=0, keepdim=True))
        q_KN /= num_samples
    q_KN *= num_samples
    return q_KN.t()


def cross_entropy_terms(teacher_probs_NK: torch.Tensor, student_logits_NK: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row ``sum_k t_k * log_softmax(s / T_s)_k`` (the negative cross-entropy), in fp32.

    Args:
        teacher_probs_NK: [N, K] teacher probabilities (no gradient needed).
        student_logits_NK: [N, K] student head outputs, any float dtype.
        student_temp: student temperature (0.1).

    Returns:
        [N] fp32.
    """
    log_p_NK = F.log_softmax(student_logits_NK.float() / student_temp, dim=-1)
    return torch.sum(teacher_probs_NK.float() * log_p_NK, dim=-1)


class TeacherTargets(nn.Module):
    """Teacher-target computation with an EMA center buffer (shared by DINO and iBOT losses).

    Buffers (all fp32): ``center`` [1, K] (persistent: checkpointed), ``pending_sum`` [1, K] and
    ``pending_count`` [1] (non-persistent: statistics of the current optimizer step).

    Args:
        out_dim: K, number of prototypes.
        student_temp: student temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"out_dim must be > 0, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("pending_sum", torch.zeros(1, out_dim), persistent=False)
        self.register_buffer("pending_count", torch.zeros(1), persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: D401 - nn.Module hook
        """Keep the statistics buffers fp32 when the owner is cast (``.half()``, ``.bfloat16()``)."""
        super()._apply(fn, recurse)
        for name in ("center", "pending_sum", "pending_count"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits_NK: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``softmax((t - center) / T)`` over prototypes, fp32.

        Args:
            teacher_logits_NK: [N, K] teacher head outputs.
            teacher_temp: teacher temperature T > 0.

        Returns:
            [N, K] fp32 probabilities.
        """
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        return F.softmax((teacher_logits_NK.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits_NK: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets; see :func:`sinkhorn_knopp`."""
        return sinkhorn_knopp(teacher_logits_NK, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits_NK: torch.Tensor) -> None:
        """Add this (micro-)batch to the pending center statistics (no collective, no host sync).

        Skipped when any value of the batch is non-finite.

        Args:
            teacher_logits_NK: [N, K] teacher head outputs (before centering).
        """
        batch_sum_1K = teacher_logits_NK.float().sum(dim=0, keepdim=True)
        ok = torch.isfinite(batch_sum_1K).all()
        self.pending_sum += torch.where(ok, batch_sum_1K, torch.zeros_like(batch_sum_1K))
        self.pending_count += ok.float() * teacher_logits_NK.shape[0]

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the pending statistics into the center: ``c = m c + (1 - m) mean``; reset them.

        ``mean`` is the all-reduced sum over all ranks' finite batches divided by their all-reduced
        row count; with no row the center is unchanged. Collective when a process group exists:
        call it on every rank, once per optimizer step.
        """
        stats = torch.cat([self.pending_sum.flatten(), self.pending_count])
        _all_reduce_(stats)
        count = stats[-1]
        mean_1K = (stats[:-1] / count.clamp(min=1.0)).view_as(self.center)
        updated = self.center * self.center_momentum + mean_1K * (1.0 - self.center_momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))
        self.pending_sum.zero_()
        self.pending_count.zero_()


class DINOLoss(TeacherTargets):
    """DINO cross-entropy between teacher targets and student CLS-token outputs.

    Follows ``dinov2/loss/dino_clstoken_loss.py``. ``forward`` sums ``-mean_rows(sum_k t log s)`` over
    every (student, teacher) pair; the caller divides by the number of terms (see
    :class:`dvtrain.train.meta_arch.SSLMetaArch`).

    Args:
        out_dim: K, number of prototypes.
        student_temp: student temperature (0.1).
        center_momentum: center EMA momentum (0.9).
    """

    def forward(
        self, student_logits_list: Sequence[torch.Tensor], teacher_probs_list: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Sum over all pairs of the row-averaged cross-entropy.

        Args:
            student_logits_list: tensors [N, K] (student head outputs, one per crop group).
            teacher_probs_list: tensors [N, K] (teacher targets, rows aligned with the students').

        Returns:
            scalar fp32 loss (sum over len(student) x len(teacher) pairs).
        """
        total = torch.zeros((), dtype=torch.float32, device=student_logits_list[0].device)
        for s_NK in student_logits_list:
            log_p_NK = F.log_softmax(s_NK.float() / self.student_temp, dim=-1)
            for t_NK in teacher_probs_list:
                total = total - torch.sum(t_NK.float() * log_p_NK, dim=-1).mean()
        return total
