"""iBOT masked-patch loss.

Follows ``dinov2/loss/ibot_patch_loss.py`` (``iBOTPatchLoss.forward_masked``): cross-entropy between
teacher targets and student outputs on the masked patch tokens of the global crops; each masked
token is weighted 1 / (masked tokens in its image) and the sum is divided by the number of global
images 2B (so every masked image contributes its mean token loss, unmasked images contribute 0).

Teacher targets and the center EMA come from :class:`dvtrain.losses.dino.TeacherTargets` (its own
``center`` buffer [1, K]). Deviations: the iBOT center is the EMA of the mean over all ranks' masked
tokens (the reference averages per-rank means); Sinkhorn-Knopp works without a process group (the
reference all-reduces the masked count unconditionally).

Shapes: M masked tokens in this rank's batch, K prototypes.
"""

from __future__ import annotations

import torch

from dvtrain.losses.dino import TeacherTargets, cross_entropy_terms

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(TeacherTargets):  # noqa: N801 - the method's name
    """Masked-patch cross-entropy with per-image token weights.

    Args:
        patch_out_dim: K, prototypes of the head used for patch tokens.
        student_temp: student temperature (0.1).
        center_momentum: center EMA momentum (0.9).
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(patch_out_dim, student_temp=student_temp, center_momentum=center_momentum)

    def forward_masked(
        self,
        student_logits_MK: torch.Tensor,
        teacher_probs_MK: torch.Tensor,
        masks_weight_M: torch.Tensor,
        num_images: int,
    ) -> torch.Tensor:
        """Weighted masked-token loss.

        Args:
            student_logits_MK: [M, K] student head outputs of the masked tokens (order of
                ``mask_indices_list``).
            teacher_probs_MK: [M, K] teacher targets for the same tokens.
            masks_weight_M: [M] float, 1 / (masked tokens of the token's image).
            num_images: 2B, the number of global images (masked or not) in this rank's batch.

        Returns:
            scalar fp32 ``-sum_m w_m sum_k t_mk log softmax(s_m / T_s)_k / num_images``.

        Raises:
            ValueError: mismatched token counts or ``num_images`` < 1.
        """
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        m = student_logits_MK.shape[0]
        if teacher_probs_MK.shape[0] != m or masks_weight_M.shape[0] != m:
            raise ValueError(
                f"masked token counts differ: student {m}, teacher {teacher_probs_MK.shape[0]}, "
                f"masks_weight {masks_weight_M.shape[0]}"
            )
        terms_M = cross_entropy_terms(teacher_probs_MK, student_logits_MK, self.student_temp)
        return -(terms_M * masks_weight_M.float()).sum() / num_images
