"""Optimizer parameter groups: layer-wise lr decay, patch-embed lr multiplier, weight-decay exemptions.

Follows ``dinov2/utils/param_groups.py`` (``get_vit_lr_decay_rate``, ``get_params_groups_with_decay``,
``fuse_params_groups``). Each group carries ``lr_multiplier``, ``wd_multiplier`` and
``is_last_layer``; the training step sets, every iteration (:func:`apply_schedule_to_param_groups`),

    group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
    group["weight_decay"] = wd * group["wd_multiplier"]

Rules per parameter name (names relative to the sub-module: ``blocks.3.attn.qkv.weight``):

- backbone (a module with ``blocks``), L = len(blocks): layer id 0 for ``patch_embed``, ``pos_embed``,
  ``cls_token``, ``mask_token``, ``register_tokens``; i + 1 for ``blocks.i.*``; L + 1 otherwise (final
  norm). ``lr_multiplier = lr_decay_rate ** (L + 1 - layer_id)``.
- heads (no ``blocks``): ``lr_multiplier = 1``.
- ``patch_embed.*``: lr multiplier times ``patch_embed_lr_mult`` (0.2).
- ``wd_multiplier = 0`` for biases, norms (``norm`` in the name), LayerScale ``gamma`` and the tokens
  (cls, register, mask, pos_embed); 1 otherwise.
- ``last_layer`` in the name: ``is_last_layer = True`` (lr 0 while the last layer is frozen).

Deviation: the reference applies weight decay to the tokens and gives ``register_tokens`` layer id
L + 1 (lr multiplier 1); here tokens get no weight decay and registers sit with the other tokens at
layer 0.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

__all__ = ["TOKEN_NAMES", "param_multipliers", "build_param_groups", "apply_schedule_to_param_groups"]

#: Parameter names of the backbone's learned tokens (layer 0, no weight decay).
TOKEN_NAMES = ("cls_token", "register_tokens", "mask_token", "pos_embed")


def param_multipliers(
    name: str, num_layers: int | None, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> dict[str, Any]:
    """Multipliers of one parameter.

    Args:
        name: parameter name relative to its sub-module (backbone or head).
        num_layers: L, number of transformer blocks for a backbone parameter; ``None`` for heads.
        lr_decay_rate: layer-wise decay rate (0.9 default; 1.0 = off).
        patch_embed_lr_mult: extra lr multiplier of the patch embedding (0.2).

    Returns:
        dict with ``lr_multiplier`` (float), ``wd_multiplier`` (0.0 or 1.0), ``is_last_layer`` (bool).
    """
    first = name.split(".")[0]
    if num_layers is None:
        lr_mult = 1.0
    else:
        if first in TOKEN_NAMES or first == "patch_embed":
            layer_id = 0
        elif first == "blocks":
            layer_id = int(name.split(".")[1]) + 1
        else:
            layer_id = num_layers + 1
        lr_mult = lr_decay_rate ** (num_layers + 1 - layer_id)
    if "patch_embed" in name:
        lr_mult *= patch_embed_lr_mult
    no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name or (num_layers is not None and first in TOKEN_NAMES)
    return {
        "lr_multiplier": float(lr_mult),
        "wd_multiplier": 0.0 if no_wd else 1.0,
        "is_last_layer": "last_layer" in name,
    }


def build_param_groups(
    submodules: Mapping[str, nn.Module],
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    split_backbone: bool = False,
) -> list[dict[str, Any]]:
    """Fused parameter groups of the trainable parameters of several sub-modules.

    Parameters with identical (lr_multiplier, wd_multiplier, is_last_layer) share one group (across
    sub-modules too), in order of first appearance. Parameters with ``requires_grad=False`` are left
    out.

    Args:
        submodules: name -> module, e.g. ``student`` (``backbone``, ``dino_head``[, ``ibot_head``]).
            A module with a ``blocks`` attribute is treated as a ViT backbone.
        lr_decay_rate: layer-wise decay rate.
        patch_embed_lr_mult: patch-embedding lr multiplier.
        split_backbone: never fuse backbone and head parameters; every group then carries
            ``is_backbone`` (needed to freeze the backbone through its lr, ``optim.freeze_backbone_iterations``).

    Returns:
        list of dicts: ``params`` (list of tensors), ``lr_multiplier``, ``wd_multiplier``,
        ``is_last_layer`` (and ``is_backbone`` when split), ``names`` (list of ``"<submodule>.<param name>"``, for logging/tests).

    Raises:
        ValueError: ``lr_decay_rate`` <= 0 or ``patch_embed_lr_mult`` < 0.
    """
    if lr_decay_rate <= 0 or patch_embed_lr_mult < 0:
        raise ValueError(
            f"lr_decay_rate must be > 0 and patch_embed_lr_mult >= 0, got {lr_decay_rate}, {patch_embed_lr_mult}"
        )
    groups: dict[tuple, dict[str, Any]] = {}
    for sub_name, module in submodules.items():
        blocks = getattr(module, "blocks", None)
        num_layers = len(blocks) if blocks is not None else None
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            mult = param_multipliers(name, num_layers, lr_decay_rate, patch_embed_lr_mult)
            key = (mult["lr_multiplier"], mult["wd_multiplier"], mult["is_last_layer"])
            if split_backbone:
                mult = {**mult, "is_backbone": num_layers is not None}
                key = (*key, num_layers is not None)
            group = groups.setdefault(key, {"params": [], "names": [], **mult})
            group["params"].append(param)
            group["names"].append(f"{sub_name}.{name}")
    return list(groups.values())


def apply_schedule_to_param_groups(
    param_groups: Iterable[dict[str, Any]], lr: float, wd: float, last_layer_lr: float,
    backbone_lr_scale: float = 1.0,
) -> None:
    """Set ``lr`` and ``weight_decay`` of every group from the schedules and its multipliers.

    Follows ``dinov2/train/train.py::apply_optim_scheduler``.

    Args:
        param_groups: ``optimizer.param_groups`` built from :func:`build_param_groups`.
        lr: scheduled learning rate of this iteration.
        wd: scheduled weight decay.
        last_layer_lr: scheduled last-layer learning rate (0 while frozen).
        backbone_lr_scale: factor on the lr of backbone groups (``is_backbone``; 0 while the backbone is
            frozen, then a linear warmup to 1). At 0 the backbone's weight decay is 0 too, so AdamW leaves
            its parameters bit-identical (``p *= 1 - lr * wd`` is ``p *= 1``, the step is ``0 * m / v``).

    Raises:
        ValueError: a group without the multiplier keys; ``backbone_lr_scale != 1`` with groups built
            without ``split_backbone``.
    """
    for i, group in enumerate(param_groups):
        try:
            lr_mult, wd_mult, last = group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"]
        except KeyError as err:
            raise ValueError(
                f"param group {i} lacks {err.args[0]!r}; build the optimizer from build_param_groups()"
            ) from None
        group["lr"] = (last_layer_lr if last else lr) * lr_mult
        group["weight_decay"] = wd * wd_mult
        if backbone_lr_scale != 1.0:
            if "is_backbone" not in group:
                raise ValueError(f"param group {i} lacks 'is_backbone'; build the groups with split_backbone=True "
                                 "to freeze the backbone")
            if group["is_backbone"]:
                group["lr"] *= backbone_lr_scale
                if backbone_lr_scale == 0.0:
                    group["weight_decay"] = 0.0
