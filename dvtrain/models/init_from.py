"""Start a run from pretrained weights (``model.init_from``): continued pretraining and resolution adaptation.

Every checkpoint kind goes through :mod:`dvtrain.checkpoint.backbone` (one code path with ``eval``/``export``):
facebookresearch/dinov2 hub files (with or without registers), dinov2 *training* checkpoints (chunked
``blocks.C.N.*`` keys, ``teacher.``/``student.`` prefixes), Hugging Face ``Dinov2Model`` directories,
dvtrain exports (hub ``.pth`` + JSON, ``.safetensors``) and dvtrain run directories (whose teacher
DINO/iBOT heads are taken too).

Order of events in a run:

1. :func:`check_init_from` (``dvtrain validate``, ``dvtrain launch`` pre-flight): metadata only, no
   weights are read. The recipe's architecture must equal the checkpoint's; otherwise ONE error names
   every differing field with the checkpoint's value and the recipe setting to use.
2. :func:`resolve_arch_from_init` (``model.arch: from_init``, applied while the recipe is loaded):
   the recipe takes the checkpoint's architecture.
3. :func:`apply_init_from` (:func:`dvtrain.train.build.build_meta_arch`, before the DeepSpeed engine is
   built, never on resume): the backbone (and the heads of a dvtrain run) go into student and teacher;
   the position table is resampled to the recipe's global crop size (logged once).

Weights in bf16/fp16 runs are rounded to the compute dtype by DeepSpeed (see docs/deviations.md); an
fp32 run keeps them bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dvtrain.models.layers import swiglu_hidden_dim

__all__ = [
    "ArchDifference",
    "architecture_differences",
    "check_init_from",
    "resolve_arch_from_init",
    "apply_init_from",
    "InitSource",
    "read_init_source",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchDifference:
    """One architecture field that differs between a checkpoint and a recipe.

    Attributes:
        what: the field in words ("width (embed_dim)"). checkpoint / recipe: the two values.
        setting: the recipe override that matches the checkpoint (``model.embed_dim=384``), or a
            sentence when no recipe field sets it.
    """

    what: str
    checkpoint: Any
    recipe: Any
    setting: str

    def __str__(self) -> str:
        return f"{self.what}: checkpoint {self.checkpoint}, recipe {self.recipe} -> set {self.setting}"


def _ffn_hidden(kw: dict[str, Any]) -> int:
    hidden = int(kw["embed_dim"] * float(kw.get("mlp_ratio", 4.0)))
    return swiglu_hidden_dim(hidden) if kw.get("ffn_layer", "mlp") == "swiglu" else hidden


def architecture_differences(checkpoint: dict[str, Any], recipe: dict[str, Any]) -> list[ArchDifference]:
    """Compare two sets of ``DinoVisionTransformer`` arguments (as ``checkpoint.backbone.backbone_kwargs`` gives).

    Compared: patch size, width, depth, heads, FFN type, FFN hidden size, registers, LayerScale, input
    channels and linear biases. Not compared: the position table size (resampled) and the resampling
    mode (a training choice).

    Args:
        checkpoint: the checkpoint's kwargs. recipe: the recipe's kwargs.

    Returns:
        One :class:`ArchDifference` per differing field (empty when they agree).
    """
    out: list[ArchDifference] = []

    def cmp(key: str, what: str, setting: str) -> None:
        a, b = checkpoint.get(key), recipe.get(key)
        if a is not None and a != b:  # None: the checkpoint does not record it (heads of a hub file)
            out.append(ArchDifference(what, a, b, setting.format(a)))

    cmp("patch_size", "patch size", "model.patch_size={}")
    cmp("embed_dim", "width (embed_dim)", "model.embed_dim={}")
    cmp("depth", "depth (blocks)", "model.depth={}")
    cmp("num_heads", "attention heads", "model.num_heads={}")
    cmp("ffn_layer", "FFN type", "model.ffn_layer={}")
    if checkpoint.get("embed_dim") == recipe.get("embed_dim") and checkpoint.get("ffn_layer") == recipe.get("ffn_layer"):
        h_ck, h_re = _ffn_hidden(checkpoint), _ffn_hidden(recipe)
        if h_ck != h_re:
            out.append(ArchDifference("FFN hidden size", h_ck, h_re, f"model.mlp_ratio={float(checkpoint.get('mlp_ratio', 4.0)):g}"))
    cmp("num_register_tokens", "register tokens", "model.num_register_tokens={}")
    ls_ck, ls_re = checkpoint.get("layerscale_init") is not None, recipe.get("layerscale_init") is not None
    if ls_ck != ls_re:
        out.append(ArchDifference("LayerScale", "yes" if ls_ck else "no", "yes" if ls_re else "no",
                                  "model.layerscale_init=1e-5" if ls_ck else "model.layerscale_init=null"))
    for key in ("in_chans", "qkv_bias", "proj_bias", "ffn_bias"):
        if key in checkpoint and key in recipe and checkpoint[key] != recipe[key]:
            out.append(ArchDifference(key, checkpoint[key], recipe[key], "(no recipe field: this checkpoint is not supported)"))
    return out


def checkpoint_kwargs(path: str) -> tuple[dict[str, Any], str]:
    """``read_backbone_config(path)`` with ``num_heads = None`` where the checkpoint does not record it: a
    facebookresearch/dinov2 state dict has no head count (tensor shapes do not depend on it); it is known
    only for the released widths (384 / 768 / 1024 / 1536).

    Raises:
        ValueError: see :func:`dvtrain.checkpoint.backbone.read_backbone_config`.
    """
    from dvtrain.checkpoint.backbone import read_backbone_config  # noqa: PLC0415

    kwargs, fmt = read_backbone_config(path)
    return _unknown_heads(kwargs, fmt), fmt


def _unknown_heads(kwargs: dict[str, Any], fmt: str) -> dict[str, Any]:
    from dvtrain.models.vit import ARCH_SPECS  # noqa: PLC0415

    if fmt == "dinov2-hub" and kwargs["embed_dim"] not in {s["embed_dim"] for s in ARCH_SPECS.values()}:
        kwargs = {**kwargs, "num_heads": None}
    return kwargs


def _recipe_kwargs(recipe: Any) -> dict[str, Any]:
    from dvtrain.checkpoint.backbone import backbone_template  # noqa: PLC0415

    return backbone_template(recipe)[0]


def _mismatch_error(field_name: str, path: str, diffs: list[ArchDifference], hint: str) -> ValueError:
    lines = "; ".join(str(d) for d in diffs)
    return ValueError(f"{field_name}={path}: the checkpoint's architecture differs from the recipe's: {lines}{hint}")


def check_init_from(recipe: Any) -> None:
    """Check ``model.init_from`` and ``distill.teacher`` of a recipe from metadata only (cheap, no weights).

    Call before any engine is built (``dvtrain validate``, launch pre-flight).

    Args:
        recipe: a validated :class:`dvtrain.recipe.Recipe` (``from_init`` already resolved).

    Raises:
        ValueError: the path is missing / unreadable / of no accepted kind (one message from
            :mod:`dvtrain.checkpoint.backbone`), or the architecture differs: one message naming every differing
            field, the checkpoint's value, the recipe's value and the setting to use.
    """
    path = recipe.model.init_from
    if path:
        try:
            ckpt_kwargs, _ = checkpoint_kwargs(path)
        except ValueError as exc:
            raise ValueError(f"model.init_from={path}: {exc}") from None
        diffs = architecture_differences(ckpt_kwargs, _recipe_kwargs(recipe))
        if diffs:
            raise _mismatch_error("model.init_from", path, diffs, " (or set model.arch=from_init to take the "
                                  "checkpoint's architecture)")
    if getattr(recipe, "distill", None) is not None and recipe.distill.teacher:
        from dvtrain.train.distill import check_distill_teacher  # noqa: PLC0415

        check_distill_teacher(recipe)


def resolve_arch_from_init(recipe: Any) -> Any:
    """``model.arch: from_init``: a copy of ``recipe`` whose model section is the checkpoint's architecture.

    Sets arch (the reference name of that width, else vit_small with explicit sizes), embed_dim, depth,
    num_heads, mlp_ratio, patch_size, ffn_layer, num_register_tokens, LayerScale on/off (the recipe's
    init value is kept when the checkpoint has LayerScale; loading overwrites the gammas) and the
    position-resampling mode of the checkpoint.

    Raises:
        ValueError: unreadable checkpoint (see :func:`dvtrain.checkpoint.backbone.read_backbone_config`).
    """
    from dvtrain.models.vit import ARCH_SPECS  # noqa: PLC0415

    kw, _ = checkpoint_kwargs(recipe.model.init_from)
    if kw["num_heads"] is None:
        kw["num_heads"] = recipe.model.num_heads or max(kw["embed_dim"] // 64, 1)
        log.warning("model.init_from=%s records no head count for width %d; using num_heads=%d (set model.num_heads)",
                    recipe.model.init_from, kw["embed_dim"], kw["num_heads"])
    arch = next((a for a, s in ARCH_SPECS.items() if s["embed_dim"] == kw["embed_dim"] and s["depth"] == kw["depth"]
                 and s["num_heads"] == kw["num_heads"]), "vit_small")
    spec = ARCH_SPECS[arch]
    m = recipe.model.model_dump()
    m.update(
        arch=arch, patch_size=kw["patch_size"], ffn_layer=kw["ffn_layer"],
        num_register_tokens=kw["num_register_tokens"], interpolate_offset=kw["interpolate_offset"],
        interpolate_antialias=kw["interpolate_antialias"],
        embed_dim=None if spec["embed_dim"] == kw["embed_dim"] else kw["embed_dim"],
        depth=None if spec["depth"] == kw["depth"] else kw["depth"],
        num_heads=None if spec["num_heads"] == kw["num_heads"] else kw["num_heads"],
        mlp_ratio=None if float(kw["mlp_ratio"]) == 4.0 else float(kw["mlp_ratio"]),
    )
    if kw.get("layerscale_init") is None:
        m["layerscale_init"] = None
    elif m["layerscale_init"] is None:
        m["layerscale_init"] = 1e-5
    return recipe.model_copy(update={"model": type(recipe.model).model_validate(m)})


@dataclass
class InitSource:
    """Weights read from an init / teacher path.

    Attributes:
        backbone: full-shape fp32 backbone state dict (plain ``blocks.N.*`` keys, the checkpoint's table grid).
        kwargs: the checkpoint's ``DinoVisionTransformer`` arguments.
        source_format: one of ``dvtrain.checkpoint.backbone.FORMATS``.
        heads: ``{"dino_head": sd[, "ibot_head": sd]}`` of a dvtrain run's teacher, else empty.
        source_recipe: the run's recipe when the source is a dvtrain run, else None.
    """

    backbone: dict[str, Tensor]
    kwargs: dict[str, Any]
    source_format: str
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    source_recipe: Any = None


def read_init_source(path: str, with_heads: bool = True) -> InitSource:
    """Load the weights of ``path`` (any input of :func:`dvtrain.checkpoint.backbone.load_backbone`; teacher side).

    Args:
        path: checkpoint file or directory. with_heads: also read the teacher heads of a dvtrain run.

    Returns:
        :class:`InitSource` (CPU fp32 tensors).

    Raises:
        ValueError: see :func:`dvtrain.checkpoint.backbone.load_backbone` / ``load_teacher_heads``.
    """
    from dvtrain.checkpoint.backbone import load_backbone, load_teacher_heads  # noqa: PLC0415

    loaded = load_backbone(path)
    sd = {k: v.detach().float().clone() for k, v in loaded.model.state_dict().items()}
    heads, recipe = load_teacher_heads(path) if with_heads else ({}, None)
    return InitSource(sd, _unknown_heads(dict(loaded.kwargs), loaded.source_format), loaded.source_format, heads,
                      recipe)


def load_backbone_weights(target: nn.Module, source: InitSource, what: str) -> None:
    """Load ``source.backbone`` strictly into the ``DinoVisionTransformer`` ``target``, resampling the
    position table to the target's grid with the target's interpolation mode (logged).

    Raises:
        ValueError: architecture differences (one message) or key / shape mismatches.
    """
    from dvtrain.checkpoint.backbone import backbone_kwargs  # noqa: PLC0415
    from dvtrain.models.convert import load_hub_state_dict  # noqa: PLC0415

    diffs = architecture_differences(source.kwargs, backbone_kwargs(target))
    if diffs:
        raise _mismatch_error(what, "", diffs, "")
    load_hub_state_dict(target, source.backbone)  # strict; resamples pos_embed to target.pos_embed_grid and logs


@torch.no_grad()
def apply_init_from(model: nn.Module, recipe: Any) -> dict[str, Any]:
    """Load ``model.init_from`` into the student AND the teacher of ``model`` (before the engine is built).

    The backbone is loaded into the student (position table resampled to ``crops.global_size`` once,
    logged) and copied into the teacher. Heads: from a dvtrain run's teacher when present and of equal
    shape (into both); otherwise the fresh heads stay (logged); ``optim.freeze_backbone_iterations``
    lets them warm up on the fixed backbone.

    Args:
        model: a meta-architecture with ``student`` / ``teacher`` ModuleDicts holding ``backbone`` and heads.
        recipe: the run's recipe (``model.init_from`` set).

    Returns:
        ``{"source_format", "heads_loaded": [names], "heads_fresh": [names]}``.

    Raises:
        ValueError: unreadable checkpoint, architecture mismatch (each field named), head shapes that
            differ from the recipe's heads (the loss.* fields named).
    """
    path = recipe.model.init_from
    try:
        src = read_init_source(path)
    except ValueError as exc:
        raise ValueError(f"model.init_from={path}: {exc}") from None
    student, teacher = model.student, model.teacher
    load_backbone_weights(student["backbone"], src, f"model.init_from={path}")
    teacher["backbone"].load_state_dict(student["backbone"].state_dict(), strict=True)
    loaded, fresh = [], []
    for name in [n for n in student.keys() if n != "backbone"]:
        sd = src.heads.get(name)
        if sd is None:
            fresh.append(name)
            continue
        own = student[name].state_dict()
        wrong = [f"{k}: checkpoint {list(v.shape)} vs recipe {list(own[k].shape)}" for k, v in sd.items()
                 if k in own and v.shape != own[k].shape]
        if wrong or set(sd) != set(own):
            raise ValueError(
                f"model.init_from={path}: the run's {name} differs from the recipe's ({'; '.join(wrong[:3])}); set "
                "loss.num_prototypes / bottleneck_dim / head_hidden_dim / head_nlayers / ibot_* as in its "
                "recipe.yaml, or start from its export (backbone only, fresh heads)"
            )
        student[name].load_state_dict(sd, strict=True)
        teacher[name].load_state_dict(sd, strict=True)
        loaded.append(name)
    log.info("model.init_from=%s (%s): backbone loaded into student and teacher; heads loaded %s, fresh %s",
             path, src.source_format, loaded or "none", fresh or "none")
    return {"source_format": src.source_format, "heads_loaded": loaded, "heads_fresh": fresh}
