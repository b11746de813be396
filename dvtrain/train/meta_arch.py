"""Student / teacher meta-architecture producing the DINOv2 loss terms.

Follows ``dinov2/train/ssl_meta_arch.py`` (``SSLMetaArch.forward_backward``) without the backward
pass, FSDP and xformers block-diagonal tricks: ``forward`` returns the named loss terms and their
weighted total; the engine runs backward / step.

Structure (so one engine wraps the whole module and student and teacher are partitioned the same
way by construction): ``student = ModuleDict(backbone, dino_head[, ibot_head])``; ``teacher`` is a
deep copy with its own storage and ``requires_grad=False``; ``dino_loss`` and ``ibot_patch_loss``
hold the ``center`` buffers (checkpointed as persistent buffers in the trainer's train state).

Step protocol (per optimizer step, on every rank; ``dvtrain.train.trainer.Trainer.train_step``):
    for micro_batch in step:  losses = model(batch, teacher_temp); backward(losses["total"])
    optimizer step (the engine; fp16 may skip it)
    ``model.apply_center_update()``   # collective, every step; folds this step's teacher statistics
    teacher EMA (the engine's sharded EMA, or ``update_teacher``), only when the step was applied

Shape legend: B images per rank, n local crops, N patch tokens per global crop, M masked tokens,
D embed width, K prototypes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dvtrain.losses.dino import DINOLoss
from dvtrain.losses.ibot import iBOTPatchLoss
from dvtrain.losses.koleo import KoLeoLoss
from dvtrain.models.heads import DINOHead
from dvtrain.models.vit import build_backbone
from dvtrain.train.param_groups import build_param_groups

__all__ = ["MetaArchConfig", "SSLMetaArch", "LOSS_KEYS"]

#: Loss-term keys ``forward`` may return besides ``total`` (a term is absent when its weight is 0).
LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")

_NUM_GLOBAL_CROPS = 2


@dataclass
class MetaArchConfig:
    """Everything :class:`SSLMetaArch` needs (the recipe maps onto it).

    Attributes:
        arch: backbone name for ``dvtrain.models.vit.build_backbone`` (vit_small ... vit_giant2, vit_tiny).
        backbone_overrides: extra ``DinoVisionTransformer`` kwargs (img_size, patch_size, ffn_layer,
            drop_path_rate, layerscale_init, num_register_tokens, interpolate_*, attn_impl, depth, ...).
        dino_head_n_prototypes, dino_head_hidden_dim, dino_head_bottleneck_dim, dino_head_nlayers:
            DINO head (65536 / 2048 / 256 / 3; L14, g14: 131072 / 2048 / 384 / 3).
        ibot_separate_head: a separate iBOT head (L14, g14) instead of sharing the DINO head.
        ibot_head_n_prototypes, ibot_head_hidden_dim, ibot_head_bottleneck_dim, ibot_head_nlayers:
            iBOT head, used only when ``ibot_separate_head``.
        centering: teacher targets, ``"centering"`` (softmax with EMA center) or ``"sinkhorn_knopp"``.
        dino_loss_weight: weight of both DINO terms (1.0).
        ibot_loss_weight: weight of the iBOT term (1.0; 0 = no iBOT, masks are ignored).
        koleo_loss_weight: weight of the KoLeo term per global crop (0.1; 0 = off).
        student_temp: student temperature (0.1).
        center_momentum: center EMA momentum (0.9).
        num_global_crops: must be 2.
        num_local_crops: n local crops per image (8; 0 allowed).
    """

    arch: str = "vit_small"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    dino_head_n_prototypes: int = 65536
    dino_head_hidden_dim: int = 2048
    dino_head_bottleneck_dim: int = 256
    dino_head_nlayers: int = 3
    ibot_separate_head: bool = False
    ibot_head_n_prototypes: int = 65536
    ibot_head_hidden_dim: int = 2048
    ibot_head_bottleneck_dim: int = 256
    ibot_head_nlayers: int = 3
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    student_temp: float = 0.1
    center_momentum: float = 0.9
    num_global_crops: int = 2
    num_local_crops: int = 8

    def validate(self) -> None:
        """Raises ValueError for unsupported values (naming the field and what is valid)."""
        if self.num_global_crops != _NUM_GLOBAL_CROPS:
            raise ValueError(f"num_global_crops must be 2 (DINOv2 pairs the two global crops), got {self.num_global_crops}")
        if self.num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {self.num_local_crops}")
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        for name in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dino_loss_weight == 0 and self.ibot_loss_weight == 0:
            raise ValueError("dino_loss_weight and ibot_loss_weight are both 0: nothing to train")


class SSLMetaArch(nn.Module):
    """DINOv2 student, EMA teacher and losses.

    Args:
        cfg: :class:`MetaArchConfig`.

    Raises:
        ValueError: invalid config (see :meth:`MetaArchConfig.validate`) or backbone arguments.
    """

    def __init__(self, cfg: MetaArchConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.do_dino = cfg.dino_loss_weight > 0
        self.do_ibot = cfg.ibot_loss_weight > 0
        self.do_koleo = cfg.koleo_loss_weight > 0

        backbone = build_backbone(cfg.arch, **cfg.backbone_overrides)
        embed_dim = backbone.embed_dim
        student = {
            "backbone": backbone,
            "dino_head": DINOHead(
                embed_dim, cfg.dino_head_n_prototypes, cfg.dino_head_hidden_dim,
                cfg.dino_head_bottleneck_dim, cfg.dino_head_nlayers,
            ),
        }
        if self.do_ibot and cfg.ibot_separate_head:
            student["ibot_head"] = DINOHead(
                embed_dim, cfg.ibot_head_n_prototypes, cfg.ibot_head_hidden_dim,
                cfg.ibot_head_bottleneck_dim, cfg.ibot_head_nlayers,
            )
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

        self.dino_loss = DINOLoss(cfg.dino_head_n_prototypes, cfg.student_temp, cfg.center_momentum)
        ibot_dim = cfg.ibot_head_n_prototypes if cfg.ibot_separate_head else cfg.dino_head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim, cfg.student_temp, cfg.center_momentum)
        self.koleo_loss = KoLeoLoss(num_crops=_NUM_GLOBAL_CROPS)
        self.teacher.eval()

    # ------------------------------------------------------------------ modes and parameters
    def train(self, mode: bool = True) -> "SSLMetaArch":
        """Student in ``mode``; the teacher always in eval mode (no drop path), as the reference."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters with ``requires_grad`` (the only ones the optimizer may see)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def param_groups(self, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        """Fused optimizer groups of the student; see :func:`dvtrain.train.param_groups.build_param_groups`."""
        return build_param_groups(self.student, lr_decay_rate, patch_embed_lr_mult)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA ``teacher = m * teacher + (1 - m) * student`` on full (unpartitioned) parameters.

        For plain (non-ZeRO-3) training; under ZeRO-3 the engine runs the EMA on the fp32 shards.

        Raises:
            RuntimeError: parameters are ZeRO-3 partitioned (they carry ``ds_id``).
        """
        student_params = list(self.student.parameters())
        teacher_params = list(self.teacher.parameters())
        if any(hasattr(p, "ds_id") for p in student_params):
            raise RuntimeError("update_teacher works on unpartitioned parameters; use the engine's EMA under ZeRO-3")
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, [p.to(t.dtype) for p, t in zip(student_params, teacher_params)],
                            alpha=1.0 - momentum)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the pending teacher statistics into both centers (centering mode; no-op otherwise).

        Collective under torch.distributed: call on every rank once per optimizer step.
        """
        if self.cfg.centering == "centering":
            self.dino_loss.apply_center_update()
            if self.do_ibot:
                self.ibot_patch_loss.apply_center_update()

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: torch.Tensor, mask_indices_M: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher targets: DINO [2, B, K] (crop order swapped) and iBOT [M, K] (or None)."""
        # through __call__ (not .forward_features) so ZeRO-3's hooks gather the backbone's own params
        out = self.teacher.backbone(global_crops, is_training=True)
        cls_2BD = out["x_norm_clstoken"]
        cls_a, cls_b = cls_2BD.chunk(_NUM_GLOBAL_CROPS)
        cls_2BD = torch.cat((cls_b, cls_a))  # student crop 1 meets teacher crop 2 and vice versa
        n_cls = cls_2BD.shape[0]
        masked_MD = None
        if self.do_ibot:
            masked_MD = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices_M)
        if masked_MD is not None and not self.cfg.ibot_separate_head:
            logits = self.teacher.dino_head(torch.cat((cls_2BD, masked_MD)))
            cls_logits_2BK, masked_logits_MK = logits[:n_cls], logits[n_cls:]
        else:
            cls_logits_2BK = self.teacher.dino_head(cls_2BD)
            masked_logits_MK = self.teacher.ibot_head(masked_MD) if masked_MD is not None else None

        if self.cfg.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits_2BK, teacher_temp)
            self.dino_loss.update_center(cls_logits_2BK)
            ibot_t = None
            if masked_logits_MK is not None:
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(masked_logits_MK, teacher_temp)
                self.ibot_patch_loss.update_center(masked_logits_MK)
        else:
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits_2BK, teacher_temp)
            ibot_t = (
                self.ibot_patch_loss.sinkhorn_knopp_teacher(masked_logits_MK, teacher_temp)
                if masked_logits_MK is not None else None
            )
        return dino_t.view(_NUM_GLOBAL_CROPS, -1, dino_t.shape[-1]), ibot_t

    def forward(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
        """Loss terms of one (micro-)batch.

        Args:
            batch: output of :func:`dvtrain.data.collate.collate_multicrop` on this module's device:
                ``collated_global_crops`` [2B, 3, G, G], ``collated_local_crops`` [nB, 3, l, l],
                ``collated_masks`` [2B, N] bool, ``mask_indices_list`` [M] int64,
                ``masks_weight`` [M] float.
            teacher_temp: teacher temperature of this iteration (schedule).

        Returns:
            dict of scalar fp32 tensors: ``dino_local_crops_loss`` (when n > 0 and DINO is on),
            ``dino_global_crops_loss`` (DINO on), ``koleo_loss`` (KoLeo on; sum over the two global
            crops, unweighted), ``ibot_loss`` (iBOT on), and ``total`` = dino_w * (local + global)
            + koleo_w * koleo + ibot_w * ibot. The DINO terms are already divided by the number of
            pairs 2 + 2n (reference normalisation); their sum is the mean over all pairs.

        Raises:
            ValueError: batch shapes that disagree with the config (odd global count, local count
                not n * B).
        """
        cfg = self.cfg
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        num_global_images = global_crops.shape[0]
        if num_global_images % _NUM_GLOBAL_CROPS != 0:
            raise ValueError(f"collated_global_crops has {num_global_images} images; expected 2B (two crops per image)")
        batch_size = num_global_images // _NUM_GLOBAL_CROPS
        n_local = cfg.num_local_crops
        if n_local > 0 and local_crops.shape[0] != n_local * batch_size:
            raise ValueError(
                f"collated_local_crops has {local_crops.shape[0]} images; expected num_local_crops * B = "
                f"{n_local} * {batch_size}"
            )
        masks_2BN = batch["collated_masks"] if self.do_ibot else None
        mask_indices_M = batch["mask_indices_list"]

        dino_targets_2BK, ibot_targets_MK = self._teacher_targets(global_crops, mask_indices_M, teacher_temp)

        # ---- student
        crops, crop_masks = [global_crops], [masks_2BN]
        if n_local > 0:
            crops.append(local_crops)
            crop_masks.append(None)
        outs = self.student.backbone(crops, crop_masks, is_training=True)  # list in -> list of dicts out
        global_out = outs[0]
        global_cls_2BD = global_out["x_norm_clstoken"]
        head_inputs = [global_cls_2BD]
        if n_local > 0:
            head_inputs.append(outs[1]["x_norm_clstoken"])
        masked_MD = None
        if self.do_ibot:
            masked_MD = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices_M)
            if not cfg.ibot_separate_head:
                head_inputs.append(masked_MD)
        sizes = [t.shape[0] for t in head_inputs]
        head_out = self.student.dino_head(torch.cat(head_inputs)).split(sizes)
        global_logits_2BK = head_out[0]
        local_logits_nBK = head_out[1] if n_local > 0 else None
        if self.do_ibot:
            masked_logits_MK = self.student.ibot_head(masked_MD) if cfg.ibot_separate_head else head_out[-1]

        # ---- losses
        n_terms = _NUM_GLOBAL_CROPS * (_NUM_GLOBAL_CROPS - 1) + max(_NUM_GLOBAL_CROPS * n_local, 1)
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=global_crops.device)
        if self.do_dino:
            if n_local > 0:
                local_loss = self.dino_loss(local_logits_nBK.chunk(n_local), list(dino_targets_2BK)) / n_terms
                losses["dino_local_crops_loss"] = local_loss
                total = total + cfg.dino_loss_weight * local_loss
            # one term over 2B rows = the mean of the two (student crop, other teacher crop) pairs
            global_loss = self.dino_loss([global_logits_2BK], [dino_targets_2BK.flatten(0, 1)]) * 2 / n_terms
            losses["dino_global_crops_loss"] = global_loss
            total = total + cfg.dino_loss_weight * global_loss
        if self.do_koleo:
            koleo = self.koleo_loss(global_cls_2BD)
            losses["koleo_loss"] = koleo
            total = total + cfg.koleo_loss_weight * koleo
        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                masked_logits_MK, ibot_targets_MK, batch["masks_weight"], num_images=num_global_images
            )
            losses["ibot_loss"] = ibot
            total = total + cfg.ibot_loss_weight * ibot
        losses["total"] = total
        return losses


def meta_arch_config_from_recipe(recipe: Any) -> MetaArchConfig:
    """Map a :class:`dvtrain.recipe.Recipe` onto :class:`MetaArchConfig`."""
    m, lo = recipe.model, recipe.loss
    overrides: dict[str, Any] = dict(
        img_size=recipe.crops.global_size, patch_size=m.patch_size, ffn_layer=m.ffn_layer,
        drop_path_rate=m.drop_path_rate, layerscale_init=m.layerscale_init,
        num_register_tokens=m.num_register_tokens, interpolate_offset=m.interpolate_offset,
        interpolate_antialias=m.interpolate_antialias, attn_impl=m.attn_impl,
        activation_checkpointing=m.activation_checkpointing,
    )
    for k in ("embed_dim", "depth", "num_heads"):
        if getattr(m, k) is not None:
            overrides[k] = getattr(m, k)
    return MetaArchConfig(
        arch=m.arch, backbone_overrides=overrides,
        dino_head_n_prototypes=lo.num_prototypes, dino_head_hidden_dim=lo.head_hidden_dim,
        dino_head_bottleneck_dim=lo.bottleneck_dim, dino_head_nlayers=lo.head_nlayers,
        ibot_separate_head=lo.ibot_separate_head, ibot_head_n_prototypes=lo.ibot_num_prototypes,
        ibot_head_hidden_dim=lo.ibot_hidden_dim, ibot_head_bottleneck_dim=lo.ibot_bottleneck_dim,
        ibot_head_nlayers=lo.head_nlayers, centering=lo.centering, dino_loss_weight=lo.dino_weight,
        ibot_loss_weight=lo.ibot_weight, koleo_loss_weight=lo.koleo_weight, student_temp=lo.student_temp,
        center_momentum=lo.center_momentum, num_local_crops=recipe.crops.num_local_crops,
    )
