"""Load a backbone from any checkpoint a dvtrain user has, detecting which kind it is.

Accepted inputs (`detect_checkpoint_format`):
- "dvtrain-training": a dvtrain training checkpoint directory (`<root>/iter_N` holding
  `COMPLETE`), a checkpoint root holding such directories (the newest is used) or a run
  directory whose `checkpoints/` holds them. Consolidated offline in one process, any world
  size: the teacher from the per-rank fp32 EMA masters (`teacher_rank<r>.pt`, joined with
  `dvtrain.checkpoint.partition.join_partitions` as the live engine does), the student from the
  DeepSpeed checkpoint's fp32 optimizer masters (`ds/`, DeepSpeed's zero_to_fp32); the
  architecture from the checkpoint's `recipe.yaml`. File names: `dvtrain.checkpoint.layout`.
- "dvtrain-hub": `X.pth` written by `dvtrain export --format hub`, with `X.pth.json` beside it.
- "dvtrain-safetensors": `X.safetensors` written by `dvtrain export --format safetensors`
  (config in `X.safetensors.json` and in the file's metadata).
- "hf": a Hugging Face directory (`config.json` with model_type dinov2 / dinov2_with_registers,
  `model.safetensors` or `pytorch_model.bin`), e.g. `dvtrain export --format hf` output.
- "dinov2-hub": a facebookresearch/dinov2 backbone state dict (`dinov2_vits14_pretrain.pth`
  ...), also the reference's `teacher_checkpoint.pth` ({"teacher": {"backbone.*": ...}}) and
  `model_*.pth` training checkpoints ({"model": {"teacher.backbone.*", "student.backbone.*"}}).
Anything else is a `ValueError` that lists these.

Files are read with `torch.load(weights_only=True)`: no arbitrary code runs while loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from dvtrain.checkpoint.atomic import find_latest_checkpoint
from dvtrain.checkpoint.layout import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    DS_TAG,
    RECIPE_FILE,
    TEACHER_FILE,
    TMP_SUFFIX,
    checkpoint_iteration,
    rank_file,
    rank_files_glob,
)
from dvtrain.checkpoint.partition import join_partitions
from dvtrain.models.convert import build_from_hub, from_hf, unchunk_block_keys
from dvtrain.models.layers import LayerScale, SwiGLUFFN
from dvtrain.models.vit import DinoVisionTransformer

EXPORT_CONFIG_VERSION = 1
HUB_FORMAT = "dvtrain-hub"
SAFETENSORS_FORMAT = "dvtrain-safetensors"
HF_PROVENANCE_FILE = "dvtrain_export.json"
WHICH = ("teacher", "student")
FORMATS = ("dvtrain-training", HUB_FORMAT, SAFETENSORS_FORMAT, "hf", "dinov2-hub")
_ACCEPTED = (
    "a dvtrain training checkpoint directory (iter_N with COMPLETE, a checkpoint root, or a run directory), "
    "a `dvtrain export` output (hub .pth + .json, .safetensors + .json, or a Hugging Face directory), "
    "or a facebookresearch/dinov2 hub state dict (.pth)"
)


@dataclass
class LoadedBackbone:
    """A backbone and where it came from.

    Attributes:
        model: the DinoVisionTransformer in eval mode, fp32, on the CPU unless a device was given.
        kwargs: `DinoVisionTransformer` constructor arguments that rebuild it (JSON-serialisable).
        source_format: one of `FORMATS`.
        which: "teacher" or "student" (exports and hub files hold one backbone: "teacher"
            unless their metadata says otherwise).
        meta: provenance (path, iteration, recipe name, ... when known).
    """

    model: DinoVisionTransformer
    kwargs: dict[str, Any]
    source_format: str
    which: str = "teacher"
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# backbone <-> constructor arguments


def backbone_kwargs(model: DinoVisionTransformer) -> dict[str, Any]:
    """The `DinoVisionTransformer` arguments that rebuild `model`'s architecture.

    Training-only settings (drop path, activation checkpointing, attention kernel) are left at
    their defaults; `layerscale_init` is 1.0 when the model has LayerScale (loading overwrites
    the gammas) and None otherwise.

    Args:
        model: a DinoVisionTransformer.

    Returns:
        JSON-serialisable dict (img_size is an int for square tables, else [H, W]).
    """
    gh, gw = model.pos_embed_grid
    p = model.patch_size
    blk = model.blocks[0]
    ffn_first = blk.mlp.w12 if isinstance(blk.mlp, SwiGLUFFN) else blk.mlp.fc1
    return {
        "img_size": gh * p if gh == gw else [gh * p, gw * p],
        "patch_size": p,
        "in_chans": model.patch_embed.proj.in_channels,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": model.num_heads,
        "mlp_ratio": float(model.mlp_ratio),
        "ffn_layer": model.ffn_layer,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "proj_bias": blk.attn.proj.bias is not None,
        "ffn_bias": ffn_first.bias is not None,
        "layerscale_init": 1.0 if isinstance(blk.ls1, LayerScale) else None,
        "num_register_tokens": model.num_register_tokens,
        "interpolate_offset": model.interpolate_offset,
        "interpolate_antialias": model.interpolate_antialias,
    }


def resampling_mode(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """How the position table is resampled to other grids (recorded beside hub exports).

    Returns:
        {"interpolation": "bicubic", "form": "scale_factor" (offset > 0, the plain dinov2 models)
        or "size" (offset 0), "offset": float, "antialias": bool}.
    """
    offset = float(kwargs.get("interpolate_offset", 0.1))
    return {
        "interpolation": "bicubic",
        "form": "scale_factor" if offset > 0 else "size",
        "offset": offset,
        "antialias": bool(kwargs.get("interpolate_antialias", False)),
    }


def build_and_load(kwargs: Mapping[str, Any], state_dict: Mapping[str, Tensor], what: str) -> DinoVisionTransformer:
    """Build a backbone from `kwargs` and load `state_dict` strictly with full-shape checks.

    Args:
        kwargs: `DinoVisionTransformer` arguments. state_dict: plain `blocks.N.*` keys.
        what: names the source in error messages.

    Returns:
        The model in eval mode (fp32, CPU).

    Raises:
        ValueError: invalid kwargs, placeholders, missing/unexpected keys or shape mismatches.
    """
    try:
        model = DinoVisionTransformer(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})
    except TypeError as exc:
        raise ValueError(f"{what}: invalid backbone config {dict(kwargs)}: {exc}") from exc
    sd = unchunk_block_keys(state_dict)
    check_full_shapes(sd, model.state_dict(), what)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def check_full_shapes(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor] | None, what: str) -> None:
    """Reject ZeRO-3 placeholders (0-element tensors) and keys/shapes differing from `expected`.

    Args:
        state_dict: tensors to check. expected: a reference state dict (e.g. a freshly built
            model's) or None to check only for empty tensors. what: names the source.

    Raises:
        ValueError: an empty tensor (a partitioned parameter that was not gathered), a missing or
            unexpected key, or a shape mismatch.
    """
    empty = [k for k, v in state_dict.items() if v.numel() == 0]
    if empty:
        raise ValueError(
            f"{what}: tensors with 0 elements {empty[:6]}{'...' if len(empty) > 6 else ''}: these are ZeRO-3 "
            f"partition placeholders, not weights; consolidate the checkpoint (gather the parameters) first"
        )
    if expected is None:
        return
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: {list(state_dict[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what} does not match its backbone config: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shape mismatches {wrong[:6]}"
        )


# ----------------------------------------------------------------------------------------------
# detection


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def export_config_path(weights: Path) -> Path:
    """`X.pth` -> `X.pth.json`, `X.safetensors` -> `X.safetensors.json`: the config beside an export
    (the full name is kept so a hub and a safetensors export of the same stem do not collide)."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".json")


def _training_checkpoint_dir(path: Path) -> Path | None:
    if (path / COMPLETE_MARKER).is_file():
        return path
    for root in (path, path / CHECKPOINTS_DIR):
        latest = find_latest_checkpoint(root)
        if latest is not None:
            return latest
    return None


def detect_checkpoint_format(path: str | Path) -> str:
    """Which kind of checkpoint `path` is (see the module docstring).

    Args:
        path: file or directory.

    Returns:
        One of `FORMATS`.

    Raises:
        ValueError: `path` does not exist or is none of the accepted kinds (the message says what
            was found and what is accepted).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; expected {_ACCEPTED}")
    if path.is_dir():
        cfg = _read_json(path / "config.json")
        if cfg is not None and str(cfg.get("model_type", "")).startswith("dinov2"):
            if (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file():
                return "hf"
            raise ValueError(f"{path} has a Dinov2 config.json but no model.safetensors / pytorch_model.bin")
        if _training_checkpoint_dir(path) is not None:
            return "dvtrain-training"
        if any(path.glob(f"iter_*{TMP_SUFFIX}")) or any((path / CHECKPOINTS_DIR).glob(f"iter_*{TMP_SUFFIX}")):
            raise ValueError(f"{path} holds only an unfinished checkpoint (iter_*.tmp-*, no COMPLETE marker)")
        raise ValueError(
            f"{path} is a directory but not a dvtrain checkpoint or a Hugging Face Dinov2 directory; expected {_ACCEPTED}"
        )
    if path.suffix == ".safetensors":
        return SAFETENSORS_FORMAT
    cfg = _read_json(export_config_path(path))
    if cfg is not None and cfg.get("format") == HUB_FORMAT:
        return HUB_FORMAT
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return "dinov2-hub"  # content is validated when loading
    raise ValueError(f"{path}: unknown checkpoint file type {path.suffix!r}; expected {_ACCEPTED}")


# ----------------------------------------------------------------------------------------------
# loading


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of many kinds
        raise ValueError(
            f"{path} cannot be read as a tensor checkpoint with torch.load(weights_only=True): {exc}. Expected {_ACCEPTED}"
        ) from exc


def _check_which(which: str, fmt: str, holds: str = "teacher") -> None:
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if which != holds:
        raise ValueError(f"a {fmt} checkpoint holds one backbone (the {holds}); --which {which} needs a training checkpoint")


def _load_dinov2_hub(path: Path, which: str) -> LoadedBackbone:
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict; expected {_ACCEPTED}")
    prefix, holds = "", "teacher"
    if isinstance(obj.get("teacher"), Mapping):  # reference teacher_checkpoint.pth
        obj, prefix = obj["teacher"], "backbone."
    elif isinstance(obj.get("model"), Mapping):  # reference model_*.pth (fvcore checkpointer)
        obj, prefix, holds = obj["model"], f"{which}.backbone.", which
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    _check_which(which, "dinov2 hub", holds)
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if prefix:
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "cls_token" not in tensors or "pos_embed" not in tensors:
        sample = ", ".join(list(obj)[:6])
        raise ValueError(
            f"{path} is not a DINOv2 backbone state dict (no cls_token / pos_embed{f' under {prefix!r}' if prefix else ''}; "
            f"first keys: {sample}); expected {_ACCEPTED}"
        )
    check_full_shapes(tensors, None, str(path))
    model = build_from_hub({k: v.float() for k, v in tensors.items()}).eval()
    return LoadedBackbone(model, backbone_kwargs(model), "dinov2-hub", which, {"path": str(path)})


def _load_dvtrain_hub(path: Path, which: str) -> LoadedBackbone:
    cfg = _read_json(export_config_path(path)) or {}
    _check_which(which, "dvtrain hub export", cfg.get("which", "teacher"))
    sd = _torch_load(path)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    model = build_and_load(cfg["backbone"], sd, str(path))
    meta = {"path": str(path), **cfg.get("provenance", {})}
    return LoadedBackbone(model, dict(cfg["backbone"]), HUB_FORMAT, which, meta)


def _load_safetensors(path: Path, which: str) -> LoadedBackbone:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    cfg = _read_json(export_config_path(path))
    if cfg is None and "dvtrain_config" in metadata:
        cfg = json.loads(metadata["dvtrain_config"])
    if cfg is None or cfg.get("format") != SAFETENSORS_FORMAT:
        raise ValueError(
            f"{path} has no dvtrain config ({export_config_path(path).name} beside it or 'dvtrain_config' metadata); "
            f"it was not written by `dvtrain export --format safetensors`"
        )
    _check_which(which, "dvtrain safetensors export", cfg.get("which", "teacher"))
    model = build_and_load(cfg["backbone"], sd, str(path))
    meta = {"path": str(path), **cfg.get("provenance", {})}
    return LoadedBackbone(model, dict(cfg["backbone"]), SAFETENSORS_FORMAT, which, meta)


def _load_hf_dir(path: Path, which: str) -> LoadedBackbone:
    config = _read_json(path / "config.json") or {}
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(path / "model.safetensors"))
    else:
        sd = _torch_load(path / "pytorch_model.bin")
    provenance = _read_json(path / HF_PROVENANCE_FILE) or {}
    _check_which(which, "Hugging Face", provenance.get("which", "teacher"))
    overrides = {}
    if "backbone" in provenance:  # a dvtrain export: restore its own position resampling mode
        overrides = {k: provenance["backbone"][k] for k in ("interpolate_offset", "interpolate_antialias")}
    sd = {k: v.float() for k, v in sd.items()}
    check_full_shapes(sd, None, str(path))
    model = from_hf(sd, config, **overrides).eval()
    meta = {"path": str(path), **provenance.get("provenance", {})}
    return LoadedBackbone(model, backbone_kwargs(model), "hf", which, meta)


def backbone_template(recipe: Any) -> tuple[dict[str, Any], dict[str, torch.Size]]:
    """Backbone constructor arguments and parameter shapes a recipe trains (built on `meta`).

    Args:
        recipe: a `dvtrain.recipe.Recipe`.

    Returns:
        (kwargs for `DinoVisionTransformer` as `backbone_kwargs` gives them, {key: shape}).
    """
    from dvtrain.models.vit import build_backbone
    from dvtrain.train.meta_arch import meta_arch_config_from_recipe

    cfg = meta_arch_config_from_recipe(recipe)
    with torch.device("meta"):
        model = build_backbone(cfg.arch, **cfg.backbone_overrides)
    return backbone_kwargs(model), {k: v.shape for k, v in model.state_dict().items()}


def backbone_from_recipe(
    recipe: Any, state_dict: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> DinoVisionTransformer:
    """A standalone eval backbone from a recipe and a consolidated state dict.

    For evaluating during/after training: `backbone_from_recipe(recipe,
    trainer.export_teacher_backbone())` gives a plain fp32 module (no ZeRO hooks) to pass to
    `dvtrain.eval.knn.knn_eval_backbone`.

    Args:
        recipe: the training `Recipe`. state_dict: full-shape backbone tensors (`blocks.N.*` keys).
        device: where to put the model.

    Returns:
        DinoVisionTransformer in eval mode, fp32.

    Raises:
        ValueError: placeholders, missing/unexpected keys or shapes differing from the recipe's.
    """
    kwargs, _ = backbone_template(recipe)
    return build_and_load(kwargs, state_dict, "backbone state dict").to(device)


def _training_backbone_template(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Size], Any]:
    """(backbone kwargs, {key: shape}, recipe) from the checkpoint's resolved `recipe.yaml`."""
    from dvtrain.recipe import load_recipe

    recipe_file = ckpt_dir / RECIPE_FILE
    if not recipe_file.is_file():
        raise ValueError(f"{ckpt_dir}: missing {RECIPE_FILE}; not a complete dvtrain training checkpoint")
    recipe = load_recipe(recipe_file)
    return (*backbone_template(recipe), recipe)


def _consolidate_teacher(ckpt_dir: Path, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Full fp32 teacher backbone from the per-rank EMA masters (`layout.TEACHER_FILE`): ZeRO-3
    partitions joined in rank order (`join_partitions`); lower stages hold full tensors."""
    files = sorted(ckpt_dir.glob(rank_files_glob(TEACHER_FILE)))
    if not files:
        raise ValueError(f"{ckpt_dir}: no teacher shards ({rank_file(TEACHER_FILE, 0)} ...)")
    states = sorted((_torch_load(f) for f in files), key=lambda st: st["rank"])
    world, stage = states[0]["world_size"], states[0]["zero_stage"]
    if [st["rank"] for st in states] != list(range(world)):
        found = [st["rank"] for st in states]
        raise ValueError(f"{ckpt_dir}: expected teacher shards of ranks 0..{world - 1}, found ranks {found}")
    out: dict[str, Tensor] = {}
    for i, name in enumerate(states[0]["names"]):
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone.") :]
        if key not in shapes:
            raise ValueError(f"{ckpt_dir}: teacher parameter {key!r} is not in the backbone its {RECIPE_FILE} builds")
        parts = [st["masters"][i] for st in states] if stage == 3 else [states[0]["masters"][i]]
        out[key] = join_partitions(parts, shapes[key], f"{ckpt_dir}: teacher shards of {key}").float()
    return out


def _consolidate_student(ckpt_dir: Path) -> dict[str, Tensor]:
    """Full fp32 student backbone from the DeepSpeed checkpoint's optimizer fp32 masters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=DS_TAG)
    except Exception as exc:  # DeepSpeed raises ValueError / KeyError / FileNotFoundError variants
        raise ValueError(f"{ckpt_dir}: cannot consolidate the student from the DeepSpeed checkpoint in ds/: {exc}") from exc
    prefix = "student.backbone."
    return {k[len(prefix) :]: v.float() for k, v in full.items() if k.startswith(prefix)}


def _load_training(path: Path, which: str) -> LoadedBackbone:
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    ckpt_dir = _training_checkpoint_dir(path)
    assert ckpt_dir is not None
    kwargs, shapes, recipe = _training_backbone_template(ckpt_dir)
    state_dict = _consolidate_teacher(ckpt_dir, shapes) if which == "teacher" else _consolidate_student(ckpt_dir)
    if "mask_token" in shapes and "mask_token" not in state_dict:
        raise ValueError(f"{ckpt_dir}: the {which} backbone lacks mask_token; checkpoint damaged")
    model = build_and_load(kwargs, state_dict, f"{ckpt_dir} ({which})")
    meta = {"path": str(ckpt_dir), "iteration": checkpoint_iteration(ckpt_dir), "recipe_name": recipe.name}
    return LoadedBackbone(model, kwargs, "dvtrain-training", which, meta)


def load_backbone(path: str | Path, which: str = "teacher", device: torch.device | str = "cpu") -> LoadedBackbone:
    """Load the backbone in any supported checkpoint (see the module docstring).

    Args:
        path: checkpoint file or directory.
        which: "teacher" (default) or "student"; only training checkpoints (ours and the
            reference's model_*.pth) hold both.
        device: where to put the model.

    Returns:
        LoadedBackbone (model in eval mode, fp32).

    Raises:
        ValueError: unknown or damaged checkpoint, `which` not held, placeholders / shape errors.
    """
    path = Path(path)
    fmt = detect_checkpoint_format(path)
    loaders = {
        "dvtrain-training": _load_training,
        HUB_FORMAT: _load_dvtrain_hub,
        SAFETENSORS_FORMAT: _load_safetensors,
        "hf": _load_hf_dir,
        "dinov2-hub": _load_dinov2_hub,
    }
    loaded = loaders[fmt](path, which)
    loaded.model.to(device)
    return loaded


__all__ = [
    "FORMATS",
    "LoadedBackbone",
    "backbone_from_recipe",
    "backbone_kwargs",
    "backbone_template",
    "build_and_load",
    "check_full_shapes",
    "detect_checkpoint_format",
    "export_config_path",
    "load_backbone",
    "resampling_mode",
]
