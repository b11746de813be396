"""Distillation from a frozen, larger teacher (DINOv2 paper, section 5): a second meta-architecture.

``distill.teacher: PATH`` names the frozen teacher; the recipe's model is the student. Two objectives:

- ``heads`` (the paper's; the teacher is a dvtrain run with DINO/iBOT heads): :class:`DistillMetaArch`
  is :class:`dvtrain.train.meta_arch.SSLMetaArch` whose targets come from the frozen teacher's backbone
  and heads instead of the EMA teacher. Same losses (DINO with centering or Sinkhorn-Knopp on the
  teacher's outputs at the scheduled teacher temperature, iBOT on masked tokens), KoLeo on the student.
- ``features`` (any backbone checkpoint): :class:`FeatureDistillMetaArch` regresses the teacher's
  normalised CLS and patch features of the two global crops from the student's, each through a learned
  linear projection (student width -> teacher width); cosine distance by default (see docs/deviations.md),
  KoLeo on the student's CLS.

Both keep ``teacher`` = an EMA of the student (the engine's sharded fp32 EMA, the paper's final model, what
is exported) and hold the frozen teacher as the sub-module ``frozen_teacher``: the one DeepSpeed engine
partitions it with everything else under ZeRO-3 (each rank stores 1/world of it), DeepSpeed casts it to
the compute dtype, it runs under ``torch.no_grad`` in eval mode, and the optimizer never sees it.

Shape legend: B images per rank, N patch tokens per global crop, D student width, E teacher width.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dvtrain.losses.koleo import KoLeoLoss
from dvtrain.models.heads import DINOHead
from dvtrain.models.vit import DinoVisionTransformer, build_backbone
from dvtrain.train.meta_arch import MetaArchConfig, SSLMetaArch

__all__ = [
    "DistillMetaArch",
    "FeatureDistillMetaArch",
    "build_distill_meta_arch",
    "check_distill_teacher",
    "teacher_temperature_advice",
    "distill_objective",
    "FEATURE_LOSS_KEYS",
]

log = logging.getLogger(__name__)

#: Loss-term keys of the features objective besides ``total``.
FEATURE_LOSS_KEYS = ("feature_cls_loss", "feature_patch_loss", "koleo_loss")


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class DistillMetaArch(SSLMetaArch):
    """The paper's distillation: :class:`SSLMetaArch` with the frozen teacher's head outputs as targets.

    Args:
        cfg: the student's :class:`MetaArchConfig`.
        frozen_teacher: ``ModuleDict(backbone, dino_head[, ibot_head])`` of the teacher, with the same
            prototype counts, the same head sharing and the same patch size as the student.
    """

    def __init__(self, cfg: MetaArchConfig, frozen_teacher: nn.ModuleDict) -> None:
        super().__init__(cfg)
        self.frozen_teacher = _freeze(frozen_teacher)

    @property
    def target_teacher(self) -> nn.ModuleDict:
        """The frozen teacher (targets), not the EMA of the student."""
        return self.frozen_teacher

    def train(self, mode: bool = True) -> "DistillMetaArch":
        """Student in ``mode``; EMA and frozen teacher always in eval mode."""
        super().train(mode)
        self.frozen_teacher.eval()
        return self


class FeatureDistillMetaArch(nn.Module):
    """Feature distillation from a backbone-only teacher.

    ``student = ModuleDict(backbone, cls_proj, patch_proj)`` (projections ``Linear(D, E)``), ``teacher``
    = its EMA copy, ``frozen_teacher = ModuleDict(backbone)``.

    Args:
        cfg: the student's :class:`MetaArchConfig` (backbone, ``koleo_loss_weight``).
        frozen_teacher: ``ModuleDict(backbone)``.
        feature_loss: ``"cosine"`` (1 - cos) or ``"mse"`` (squared error to the LayerNorm-standardised
            teacher feature, mean over elements).
        cls_weight, patch_weight: weights of the two terms.
    """

    def __init__(self, cfg: MetaArchConfig, frozen_teacher: nn.ModuleDict, feature_loss: str = "cosine",
                 cls_weight: float = 1.0, patch_weight: float = 1.0) -> None:
        super().__init__()
        if feature_loss not in ("cosine", "mse"):
            raise ValueError(f"distill.feature_loss must be 'cosine' or 'mse', got {feature_loss!r}")
        self.cfg = cfg
        self.feature_loss = feature_loss
        self.cls_weight, self.patch_weight = float(cls_weight), float(patch_weight)
        backbone = build_backbone(cfg.arch, **cfg.backbone_overrides)
        d_student, d_teacher = backbone.embed_dim, frozen_teacher["backbone"].embed_dim
        self.student = nn.ModuleDict({
            "backbone": backbone,
            "cls_proj": nn.Linear(d_student, d_teacher),
            "patch_proj": nn.Linear(d_student, d_teacher),
        })
        self.teacher = _freeze(copy.deepcopy(self.student))
        self.frozen_teacher = _freeze(frozen_teacher)
        self.koleo_loss = KoLeoLoss(num_crops=2)
        self.do_koleo = cfg.koleo_loss_weight > 0

    def train(self, mode: bool = True) -> "FeatureDistillMetaArch":
        """Student in ``mode``; EMA and frozen teacher always in eval mode."""
        super().train(mode)
        self.teacher.eval()
        self.frozen_teacher.eval()
        return self

    # the optimizer's view of the student is SSLMetaArch's (one rule): trainable student
    # parameters, and its fused groups, where the projections count as heads (lr multiplier 1)
    trainable_parameters = SSLMetaArch.trainable_parameters
    param_groups = SSLMetaArch.param_groups

    def apply_center_update(self) -> None:
        """No centers in this objective (kept for the trainer's step protocol)."""

    def _distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.feature_loss == "cosine":
            return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
        return F.mse_loss(pred, F.layer_norm(target, target.shape[-1:]))

    def forward(self, batch: dict[str, Any], teacher_temp: float = 0.0) -> dict[str, torch.Tensor]:
        """Loss terms of one (micro-)batch (global crops only; local crops and masks are not used).

        Args:
            batch: collated batch with ``collated_global_crops`` [2B, 3, G, G].
            teacher_temp: unused (the trainer's step protocol passes it).

        Returns:
            scalar fp32 tensors ``feature_cls_loss``, ``feature_patch_loss``, ``koleo_loss`` (when on) and
            ``total`` = cls_weight * cls + patch_weight * patch + koleo_weight * koleo.
        """
        crops = batch["collated_global_crops"]
        with torch.no_grad():
            t_out = self.frozen_teacher.backbone(crops, is_training=True)
        t_cls_2BE, t_patch_2BNE = t_out["x_norm_clstoken"], t_out["x_norm_patchtokens"]
        s_out = self.student.backbone(crops, is_training=True)
        s_cls_2BD, s_patch_2BND = s_out["x_norm_clstoken"], s_out["x_norm_patchtokens"]
        if t_patch_2BNE.shape[1] != s_patch_2BND.shape[1]:  # other patch size: teacher grid -> student grid
            t_side, s_side = int(t_patch_2BNE.shape[1] ** 0.5), int(s_patch_2BND.shape[1] ** 0.5)
            grid = t_patch_2BNE.float().transpose(1, 2).reshape(t_patch_2BNE.shape[0], -1, t_side, t_side)
            grid = F.interpolate(grid, size=(s_side, s_side), mode="bilinear", align_corners=False)
            t_patch_2BNE = grid.flatten(2).transpose(1, 2)
        cls_loss = self._distance(self.student.cls_proj(s_cls_2BD), t_cls_2BE)
        patch_loss = self._distance(self.student.patch_proj(s_patch_2BND), t_patch_2BNE)
        total = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        losses = {"feature_cls_loss": cls_loss, "feature_patch_loss": patch_loss}
        if self.do_koleo:
            koleo = self.koleo_loss(s_cls_2BD)
            losses["koleo_loss"] = koleo
            total = total + self.cfg.koleo_loss_weight * koleo
        losses["total"] = total
        return losses


# ----------------------------------------------------------------------------------------------
# building from a recipe


def distill_objective(recipe: Any) -> str:
    """``"heads"`` or ``"features"``: ``distill.objective``, with ``auto`` = heads iff the teacher is a
    dvtrain training run (the only kind that carries DINO/iBOT heads).

    Raises:
        ValueError: ``heads`` asked for a teacher without heads; the path is of no accepted kind.
    """
    from dvtrain.checkpoint.backbone import detect_checkpoint_format  # noqa: PLC0415

    path = recipe.distill.teacher
    try:
        fmt = detect_checkpoint_format(path)
    except ValueError as exc:
        raise ValueError(f"distill.teacher={path}: {exc}") from None
    has_heads = fmt == "dvtrain-training"
    obj = recipe.distill.objective
    if obj == "heads" and not has_heads:
        raise ValueError(
            f"distill.objective=heads needs a teacher with DINO/iBOT heads (a dvtrain run directory); "
            f"distill.teacher={path} is a {fmt} checkpoint (backbone only): set distill.objective=features or auto"
        )
    return obj if obj != "auto" else ("heads" if has_heads else "features")


def _teacher_recipe(path: str) -> Any:
    from dvtrain.checkpoint.backbone import _training_checkpoint_dir  # noqa: PLC0415
    from dvtrain.recipe import load_recipe  # noqa: PLC0415

    return load_recipe(Path(_training_checkpoint_dir(Path(path))) / "recipe.yaml")


def check_distill_teacher(recipe: Any) -> None:
    """Metadata-only checks of ``distill.teacher`` against the student recipe (before any engine).

    Raises:
        ValueError: unreadable teacher; heads objective with another patch size, prototype count or head
            sharing than the student (each named with the recipe field to set); features objective with a
            global crop that is not a multiple of the teacher's patch size.
    """
    from dvtrain.checkpoint.backbone import read_backbone_config  # noqa: PLC0415

    path = recipe.distill.teacher
    obj = distill_objective(recipe)
    try:
        kw, _ = read_backbone_config(path)
    except ValueError as exc:
        raise ValueError(f"distill.teacher={path}: {exc}") from None
    problems = []
    if obj == "heads":
        t = _teacher_recipe(path)
        if kw["patch_size"] != recipe.model.patch_size:
            problems.append(f"patch size: teacher {kw['patch_size']}, student {recipe.model.patch_size} -> set "
                            f"model.patch_size={kw['patch_size']} (iBOT pairs teacher and student patch tokens)")
        for fld in ("num_prototypes", "ibot_separate_head") + (
                ("ibot_num_prototypes",) if t.loss.ibot_separate_head else ()):
            a, b = getattr(t.loss, fld), getattr(recipe.loss, fld)
            if a != b:
                problems.append(f"{fld}: teacher {a}, student {b} -> set loss.{fld}={a}")
        if (t.loss.ibot_weight > 0) != (recipe.loss.ibot_weight > 0) and recipe.loss.ibot_weight > 0:
            problems.append("the teacher run has no iBOT head output (loss.ibot_weight=0): set loss.ibot_weight=0")
    elif recipe.crops.global_size % kw["patch_size"]:
        problems.append(f"crops.global_size={recipe.crops.global_size} is not a multiple of the teacher's patch "
                        f"size {kw['patch_size']}")
    if problems:
        raise ValueError(f"distill.teacher={path} ({obj} objective): " + "; ".join(problems))


def teacher_temperature_advice(recipe: Any) -> str | None:
    """A warning when the heads objective would read the frozen teacher at a flatter temperature than its run
    trained with (``teacher.temp`` of the student recipe above the teacher run's); otherwise None.

    Why: the targets are softmax(head output / ``teacher.temp``). The demo's heads trained at 0.02 give
    2.5-nat targets at 0.02 but 5.6 nats at 0.04 (ln 1024 = 6.9 is uniform), and near-uniform targets
    carry little to distil: students distilled from the 0.04-trained demo only matched their teacher
    (README, "Measured on the bundled data"). Call after :func:`check_distill_teacher` passed.
    """
    if not recipe.distill.teacher or distill_objective(recipe) != "heads":
        return None
    t = _teacher_recipe(recipe.distill.teacher).teacher
    if recipe.teacher.temp <= t.temp:
        return None
    return (f"teacher.temp={recipe.teacher.temp:g} is above the {t.temp:g} the distillation teacher "
            f"({recipe.distill.teacher}) trained its heads with: its targets will be flatter than it learned to "
            f"produce, and near-uniform targets carry little to distil; set teacher.temp={t.temp:g} "
            f"(and teacher.temp_warmup_start)")


def build_distill_meta_arch(recipe: Any) -> nn.Module:
    """The distillation meta-architecture of a recipe with ``distill.teacher`` set.

    The frozen teacher is always loaded from ``distill.teacher`` (also on resume: it is part of the
    objective, not of the run state); its position table is resampled once to ``crops.global_size``.

    Returns:
        :class:`DistillMetaArch` (heads objective) or :class:`FeatureDistillMetaArch`.

    Raises:
        ValueError: see :func:`check_distill_teacher` and :func:`dvtrain.models.init_from.read_init_source`.
    """
    from dvtrain.models.init_from import load_backbone_weights, read_init_source  # noqa: PLC0415
    from dvtrain.train.meta_arch import meta_arch_config_from_recipe  # noqa: PLC0415

    check_distill_teacher(recipe)
    path = recipe.distill.teacher
    objective = distill_objective(recipe)
    src = read_init_source(path, with_heads=objective == "heads")
    kwargs = {**src.kwargs, "img_size": recipe.crops.global_size, "attn_impl": recipe.model.attn_impl}
    if kwargs["num_heads"] is None:  # a dinov2 hub file of a non-released width records no head count
        kwargs["num_heads"] = max(kwargs["embed_dim"] // 64, 1)
        log.warning("distill.teacher=%s records no head count; assuming %d heads", path, kwargs["num_heads"])
    teacher_backbone = DinoVisionTransformer(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})
    load_backbone_weights(teacher_backbone, src, f"distill.teacher={path}")
    frozen = nn.ModuleDict({"backbone": teacher_backbone})
    cfg = meta_arch_config_from_recipe(recipe)
    if objective == "heads":
        lo = src.source_recipe.loss
        heads = {"dino_head": DINOHead(teacher_backbone.embed_dim, lo.num_prototypes, lo.head_hidden_dim,
                                       lo.bottleneck_dim, lo.head_nlayers)}
        if lo.ibot_separate_head and "ibot_head" in src.heads:
            heads["ibot_head"] = DINOHead(teacher_backbone.embed_dim, lo.ibot_num_prototypes, lo.ibot_hidden_dim,
                                          lo.ibot_bottleneck_dim, lo.head_nlayers)
        for name, head in heads.items():
            head.load_state_dict(src.heads[name], strict=True)
            frozen[name] = head
        model: nn.Module = DistillMetaArch(cfg, frozen)
    else:
        d = recipe.distill
        model = FeatureDistillMetaArch(cfg, frozen, d.feature_loss, d.cls_weight, d.patch_weight)
    n_teacher = sum(p.numel() for p in frozen.parameters())
    n_student = sum(p.numel() for p in model.student.parameters())
    log.info("distillation (%s objective) from %s (%s): teacher %.2fM parameters, student %.2fM",
             objective, path, src.source_format, n_teacher / 1e6, n_student / 1e6)
    return model
