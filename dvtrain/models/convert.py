"""Checkpoint interop: facebookresearch/dinov2 hub state dicts and Hugging Face transformers Dinov2.

Hub format (dinov2/hub/backbones.py, `dinov2_vits14` ...): our own key names, so loading is a
strict `load_state_dict` after three explicit fixes: FSDP chunk keys `blocks.C.N.*` are unchunked,
a position table of another grid is resampled (and logged), and structural mismatches (registers,
LayerScale, FFN kind) become `ValueError`s that say which argument to change.

Hugging Face (`transformers.Dinov2Model`, `Dinov2WithRegistersModel`): q/k/v are separate
Linears (`attention.attention.{query,key,value}`), LayerScale is `layer_scale{1,2}.lambda1`, SwiGLU
is `mlp.weights_in` / `mlp.weights_out` (same packed [gate | up] layout and the same hidden-size
rule (int(int(D * mlp_ratio) * 2 / 3) + 7) // 8 * 8), and every block has LayerScale and FFN /
output-projection biases. HF resamples positions with an explicit output size (no 0.1 offset);
`Dinov2Model` without antialias, `Dinov2WithRegistersModel` with antialias. Models built by
`from_hf` use that same mode so their outputs equal HF's at every resolution.

Shape legend: D width, M table grid side, R registers.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from dvtrain.models.layers import LayerScale, SwiGLUFFN, swiglu_hidden_dim
from dvtrain.models.archs import ARCH_SPECS
from dvtrain.models.vit import DinoVisionTransformer, resample_pos_embed

logger = logging.getLogger(__name__)

_CHUNKED_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


# ==============================================================================================
# facebookresearch/dinov2 hub format
# ==============================================================================================
def unchunk_block_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename FSDP block-chunk keys `blocks.C.N.rest` to plain `blocks.N.rest`.

    Reference: dinov2/models/vision_transformer.py `BlockChunk` (block_chunks > 0 keeps the global
    block index N inside each chunk C). Plain keys pass unchanged.

    Args:
        state_dict: backbone state dict.

    Returns:
        New dict with plain keys (same tensors).

    Raises:
        ValueError: two keys map to the same plain key.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _CHUNKED_KEY.match(key)
        new_key = f"blocks.{m.group(2)}.{m.group(3)}" if m else key
        if new_key in out:
            raise ValueError(f"state dict has both chunked and plain keys for {new_key!r}")
        out[new_key] = value
    return out


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        sample = ", ".join(list(state_dict)[:5])
        raise ValueError(f"no key starts with prefix {prefix!r}; first keys: {sample}")
    return out


def _square_side(num_patches: int, what: str) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{what} has {num_patches} patch positions, not a square grid")
    return side


def hub_backbone_kwargs(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Infer `DinoVisionTransformer` arguments from a hub-format backbone state dict.

    Widths, depth, FFN kind and hidden size, patch size, table grid (img_size), registers and
    LayerScale come from tensor shapes; the head count from `ARCH_SPECS` by width (else D / 64).
    Interpolation follows dinov2/hub/backbones.py: offset 0.1 without registers, explicit size with
    antialias for register models.

    Args:
        state_dict: hub-format backbone state dict (plain or chunked keys).

    Returns:
        kwargs for `DinoVisionTransformer` (layerscale_init 1.0 when gammas are present: the value
        is overwritten by loading).

    Raises:
        ValueError: keys missing or a hidden size no mlp_ratio reproduces.
    """
    sd = unchunk_block_keys(state_dict)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        if key not in sd:
            raise ValueError(f"not a DINOv2 hub backbone state dict: missing {key!r}")
    D = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(_BLOCK_KEY.match(k).group(1)) for k in sd if _BLOCK_KEY.match(k))
    side = _square_side(sd["pos_embed"].shape[1] - 1, "pos_embed")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1] if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / D
    if swiglu:
        mlp_ratio = next((r for r in (4.0, 8 / 3, 2.0, 3.0, 1.0) if swiglu_hidden_dim(int(D * r)) == hidden), None)
        if mlp_ratio is None:
            raise ValueError(f"SwiGLU hidden size {hidden} at width {D} is not produced by a standard mlp_ratio")
    elif int(D * mlp_ratio) != hidden:
        raise ValueError(f"MLP hidden size {hidden} at width {D} is not int(D * ratio) for ratio {mlp_ratio}")
    num_heads = next((s["num_heads"] for s in ARCH_SPECS.values() if s["embed_dim"] == D), max(D // 64, 1))
    reg = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return {
        "img_size": side * patch,
        "patch_size": patch,
        "in_chans": sd["patch_embed.proj.weight"].shape[1],
        "embed_dim": D,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "ffn_layer": "swiglu" if swiglu else "mlp",
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "ffn_bias": ("blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias") in sd,
        "layerscale_init": 1.0 if "blocks.0.ls1.gamma" in sd else None,
        "num_register_tokens": reg,
        "interpolate_offset": 0.0 if reg else 0.1,
        "interpolate_antialias": bool(reg),
    }


def load_hub_state_dict(model: DinoVisionTransformer, state_dict: Mapping[str, Tensor], prefix: str = "") -> None:
    """Load a facebookresearch/dinov2 hub-format backbone state dict strictly into `model`.

    Reference: dinov2/hub/backbones.py (what `torch.hub.load("facebookresearch/dinov2", ...)`
    loads). Chunked keys are unchunked; a `pos_embed` of another square grid is resampled to the
    model's table grid with the model's interpolation mode and logged; afterwards every key must
    match (no missing, no unexpected keys, equal shapes).

    Args:
        model: target backbone.
        state_dict: hub-format tensors (e.g. `torch.load("dinov2_vits14_pretrain.pth")`).
        prefix: keep only keys with this prefix and strip it (e.g. "backbone." for the
            `teacher` entry of a reference training checkpoint).

    Raises:
        ValueError: register / LayerScale / FFN-kind mismatch, other shape mismatches, or
            missing / unexpected keys, each with the argument to change.
    """
    sd = unchunk_block_keys(_strip_prefix(state_dict, prefix))
    R = model.num_register_tokens
    ckpt_R = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if ckpt_R != R:
        raise ValueError(
            f"checkpoint has {ckpt_R} register tokens but the model has num_register_tokens={R}; "
            f"build the model with num_register_tokens={ckpt_R} (e.g. the *_reg hub models use 4)"
        )
    model_ls = isinstance(model.blocks[0].ls1, LayerScale)
    if ("blocks.0.ls1.gamma" in sd) != model_ls:
        have = "has" if "blocks.0.ls1.gamma" in sd else "has no"
        raise ValueError(
            f"checkpoint {have} LayerScale (blocks.N.ls1.gamma) but the model was built with "
            f"layerscale_init={'None' if not model_ls else 'a value'}; "
            f"set layerscale_init={'1.0' if not model_ls else 'None'}"
        )
    model_swiglu = isinstance(model.blocks[0].mlp, SwiGLUFFN)
    if ("blocks.0.mlp.w12.weight" in sd) != model_swiglu:
        want = "swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp"
        raise ValueError(f"checkpoint FFN is {want!r} but the model has ffn_layer={model.ffn_layer!r}")
    if "pos_embed" in sd and tuple(sd["pos_embed"].shape) != tuple(model.pos_embed.shape):
        pos = sd["pos_embed"]
        side = _square_side(pos.shape[1] - 1, "checkpoint pos_embed")
        patch_pos = resample_pos_embed(
            pos[:, 1:], (side, side), model.pos_embed_grid, model.interpolate_offset, model.interpolate_antialias
        )
        sd["pos_embed"] = torch.cat((pos[:, :1].float(), patch_pos), dim=1).to(pos.dtype)
        logger.info(
            "resampled checkpoint pos_embed from a %dx%d to a %dx%d grid (bicubic, offset %g, antialias %s)",
            side, side, *model.pos_embed_grid, model.interpolate_offset, model.interpolate_antialias,
        )  # fmt: skip
    _strict_load(model, sd, "hub checkpoint")


def _strict_load(model: torch.nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what} does not match the model (check arch, patch_size, mlp_ratio, biases): "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"shape mismatches {wrong[:8]}"
        )
    model.load_state_dict(sd, strict=True)


def build_from_hub(state_dict: Mapping[str, Tensor], prefix: str = "", **overrides) -> DinoVisionTransformer:
    """Build a backbone shaped like a hub checkpoint and load it (`hub_backbone_kwargs` + load).

    Args:
        state_dict: hub-format backbone tensors. prefix: see `load_hub_state_dict`.
        **overrides: `DinoVisionTransformer` arguments to change (e.g. img_size=224 to resample
            the table to 16x16, drop_path_rate / layerscale settings for continued training).

    Returns:
        The loaded model (train mode, as built).
    """
    sd = unchunk_block_keys(_strip_prefix(state_dict, prefix))
    model = DinoVisionTransformer(**{**hub_backbone_kwargs(sd), **overrides})
    load_hub_state_dict(model, sd)
    return model


# ==============================================================================================
# Hugging Face transformers Dinov2Model / Dinov2WithRegistersModel
# ==============================================================================================
_HF_GLOBAL = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
}


def to_hf_state_dict(model: DinoVisionTransformer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Convert a backbone to a Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint.

    Usage: `cfg, sd = to_hf_state_dict(m); hf = Dinov2Model(Dinov2Config(**cfg));
    hf.load_state_dict(sd)` (`Dinov2WithRegisters*` when `cfg["model_type"]` says so), then
    `hf.save_pretrained(dir)`. Missing pieces HF always has are filled so outputs are unchanged:
    LayerScale 1 for a model without LayerScale, zero biases for bias-free projections/FFNs.

    Args:
        model: backbone with a square position table.

    Returns:
        (config dict for `Dinov2Config` / `Dinov2WithRegistersConfig`, incl. `model_type` and
        `architectures`; state dict with HF keys, tensors cloned to CPU).

    Raises:
        ValueError: non-square position table (HF assumes a square one).

    HF resamples positions with an explicit size (registers: with antialias); a model with
    another mode (the reference's 0.1 offset) gives slightly different outputs at resolutions
    other than the table's in HF. This is logged.
    """
    gh, gw = model.pos_embed_grid
    if gh != gw:
        raise ValueError(f"Hugging Face Dinov2 needs a square position table, this model's is {gh}x{gw}")
    R = model.num_register_tokens
    hf_mode = (0.0, bool(R))
    if (model.interpolate_offset, model.interpolate_antialias) != hf_mode:
        logger.warning(
            "model resamples positions with offset %g / antialias %s, HF %s uses an explicit size / antialias %s: "
            "outputs agree at %d px, differ slightly at other resolutions",
            model.interpolate_offset, model.interpolate_antialias,
            "Dinov2WithRegistersModel" if R else "Dinov2Model", hf_mode[1], gh * model.patch_size,
        )  # fmt: skip
    own = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    D = model.embed_dim
    sd: dict[str, Tensor] = {}
    for ours, theirs in _HF_GLOBAL.items():
        if ours in own:
            sd[theirs] = own[ours]
    blk0 = model.blocks[0]
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = own[src + "attn.qkv.weight"].chunk(3, dim=0)
        for name, t in zip(("query", "key", "value"), (q, k, v)):
            sd[f"{dst}attention.attention.{name}.weight"] = t.clone()
        if src + "attn.qkv.bias" in own:
            for name, t in zip(("query", "key", "value"), own[src + "attn.qkv.bias"].chunk(3)):
                sd[f"{dst}attention.attention.{name}.bias"] = t.clone()
        for ours, theirs in _HF_BLOCK.items():
            if src + ours + ".weight" not in own:  # the other FFN kind
                continue
            w = own[src + ours + ".weight"]
            sd[dst + theirs + ".weight"] = w
            sd[dst + theirs + ".bias"] = own.get(src + ours + ".bias", torch.zeros(w.shape[0], dtype=w.dtype))
        for j in (1, 2):
            gamma = own.get(f"{src}ls{j}.gamma", torch.ones(D, dtype=own[src + "norm1.weight"].dtype))
            sd[f"{dst}layer_scale{j}.lambda1"] = gamma
    config: dict[str, Any] = {
        "model_type": "dinov2_with_registers" if R else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if R else "Dinov2Model"],
        "hidden_size": D,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": gh * model.patch_size,
        "patch_size": model.patch_size,
        "num_channels": model.patch_embed.proj.in_channels,
        "qkv_bias": blk0.attn.qkv.bias is not None,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": isinstance(blk0.mlp, SwiGLUFFN),
    }
    if R:
        config["num_register_tokens"] = R
    else:
        config["use_mask_token"] = True
    return config, sd


def _hf_get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def hf_backbone_kwargs(config: Any) -> dict[str, Any]:
    """`DinoVisionTransformer` arguments of a Hugging Face Dinov2 config (object or `config.json` dict).

    Positions are resampled as HF does (explicit size, antialias iff registers).

    Raises:
        ValueError: an activation other than exact "gelu" or a LayerNorm eps other than 1e-6.
    """
    act = _hf_get(config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"HF config hidden_act={act!r}; only exact 'gelu' (as DINOv2) is supported")
    eps = _hf_get(config, "layer_norm_eps", 1e-6)
    if eps != 1e-6:
        raise ValueError(f"HF config layer_norm_eps={eps}; DINOv2 backbones use 1e-6")
    image_size, patch = _hf_get(config, "image_size", 224), _hf_get(config, "patch_size", 14)
    if not isinstance(image_size, int):
        image_size = tuple(image_size)
    R = int(_hf_get(config, "num_register_tokens", 0) or 0)  # Dinov2Config has none
    return {
        "img_size": image_size,
        "patch_size": patch,
        "in_chans": _hf_get(config, "num_channels", 3),
        "embed_dim": _hf_get(config, "hidden_size"),
        "depth": _hf_get(config, "num_hidden_layers"),
        "num_heads": _hf_get(config, "num_attention_heads"),
        "mlp_ratio": _hf_get(config, "mlp_ratio", 4),
        "ffn_layer": "swiglu" if _hf_get(config, "use_swiglu_ffn", False) else "mlp",
        "qkv_bias": _hf_get(config, "qkv_bias", True),
        "layerscale_init": _hf_get(config, "layerscale_value", 1.0) or 1.0,
        "num_register_tokens": R,
        "interpolate_offset": 0.0,
        "interpolate_antialias": bool(R),
    }


def from_hf(hf_model_or_state_dict: Any, config: Any = None, **overrides) -> DinoVisionTransformer:
    """Build a backbone from a Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`.

    Args:
        hf_model_or_state_dict: an HF model (also `*ForImageClassification` / `*Backbone`, whose
            `dinov2` base model is used) or its state dict (keys with or without a `dinov2.` /
            `dinov2_with_registers.` prefix).
        config: the HF config (object or dict); required for a state dict, else `model.config`.
        **overrides: `DinoVisionTransformer` arguments. By default the model resamples positions
            as HF does (explicit size; antialias iff registers) so outputs equal HF's at every
            size; pass `interpolate_offset=0.1` for the reference dinov2 behaviour.

    Returns:
        The loaded backbone (layerscale gammas and biases from HF; a missing HF mask token
        (`use_mask_token=False`) becomes zeros, which is logged).

    Raises:
        ValueError: no config, an activation other than exact "gelu", a LayerNorm eps other than
            1e-6, or keys/shapes that do not match.
    """
    if isinstance(hf_model_or_state_dict, torch.nn.Module):
        hf = hf_model_or_state_dict
        for attr in ("dinov2", "dinov2_with_registers"):
            hf = getattr(hf, attr, hf)
        config = config if config is not None else hf.config
        hf_sd = hf.state_dict()
    else:
        hf_sd = dict(hf_model_or_state_dict)
    if config is None:
        raise ValueError("from_hf needs the HF config (Dinov2Config or its dict) when given a state dict")
    for prefix in ("dinov2.", "dinov2_with_registers."):
        if any(k.startswith(prefix + "embeddings.") for k in hf_sd):
            hf_sd = {k[len(prefix) :]: v for k, v in hf_sd.items() if k.startswith(prefix)}
    kwargs = {**hf_backbone_kwargs(config), **overrides}
    model = DinoVisionTransformer(**kwargs)
    _, template = to_hf_state_dict(model)  # our keys <-> HF keys, by construction
    if "embeddings.mask_token" not in hf_sd:
        logger.info("HF checkpoint has no mask token (use_mask_token=False); initialising it to zeros")
        hf_sd["embeddings.mask_token"] = torch.zeros_like(template["embeddings.mask_token"])
    _check_keys(template, hf_sd)
    sd: dict[str, Tensor] = {}
    inv_global = {v: k for k, v in _HF_GLOBAL.items()}
    for key, value in hf_sd.items():
        if key in inv_global:
            sd[inv_global[key]] = value
    for i in range(len(model.blocks)):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        sd[dst + "attn.qkv.weight"] = torch.cat([hf_sd[f"{att}{n}.weight"] for n in ("query", "key", "value")])
        if model.blocks[i].attn.qkv.bias is not None:
            sd[dst + "attn.qkv.bias"] = torch.cat([hf_sd[f"{att}{n}.bias"] for n in ("query", "key", "value")])
        for ours, theirs in _HF_BLOCK.items():
            for suffix in (".weight", ".bias"):
                if src + theirs + suffix in hf_sd:
                    sd[dst + ours + suffix] = hf_sd[src + theirs + suffix]
        for j in (1, 2):
            sd[f"{dst}ls{j}.gamma"] = hf_sd[f"{src}layer_scale{j}.lambda1"]
    _strict_load(model, sd, "HF checkpoint")
    return model


def _check_keys(template: Mapping[str, Tensor], hf_sd: Mapping[str, Tensor]) -> None:
    missing = sorted(set(template) - set(hf_sd))
    unexpected = sorted(set(hf_sd) - set(template))
    wrong = [k for k in template if k in hf_sd and template[k].shape != hf_sd[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"HF checkpoint does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches {wrong[:8]}"
        )
