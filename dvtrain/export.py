"""Export a trained backbone: torch.hub state dict, Hugging Face transformers directory, safetensors.

Formats (`dvtrain export --checkpoint CKPT --format hub|hf|safetensors --out PATH`):
- hub: `PATH` (.pth) = the plain backbone state dict of facebookresearch/dinov2
  (dinov2/hub/backbones.py): `cls_token`, `pos_embed`, `register_tokens` (when R > 0),
  `mask_token`, `patch_embed.proj.*`, `blocks.N.*` (never FSDP-chunked), every LayerScale
  gamma, `norm.*`, fp32. `PATH.json` beside it (e.g. `vits14.pth.json`) records the constructor arguments and
  the position-embedding resampling mode, which the tensors cannot show (offset 0.1 scale-factor
  form for plain models, explicit size + antialias for register models).
- hf: a directory for `transformers.Dinov2Model.from_pretrained` (no registers) or
  `Dinov2WithRegistersModel.from_pretrained` (registers): config.json, model.safetensors,
  preprocessor_config.json, and dvtrain_export.json (provenance). The key mapping is
  `dvtrain.models.convert.to_hf_state_dict`. The export reloads the directory with transformers
  and checks that its outputs equal ours (max |diff| is recorded).
- safetensors: `PATH` (.safetensors) with the hub-format keys + `PATH.json` (config; also in
  the file's metadata).

Every tensor is checked to have its full shape (ZeRO-3 keeps 0-element placeholders in
unconsolidated state dicts); the input is any checkpoint `dvtrain.checkpoint.backbone.load_backbone`
accepts (training checkpoints: `--which teacher|student`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import typer

from dvtrain import installed_version
from dvtrain.checkpoint.atomic import write_json_atomic
from dvtrain.checkpoint.backbone import (
    EXPORT_CONFIG_VERSION,
    HF_PROVENANCE_FILE,
    HUB_FORMAT,
    SAFETENSORS_FORMAT,
    LoadedBackbone,
    backbone_kwargs,
    check_full_shapes,
    export_config_path,
    load_backbone,
    resampling_mode,
)
from dvtrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dvtrain.errors import run_user_command
from dvtrain.eval.commands import CHECKPOINT_HELP
from dvtrain.models.convert import to_hf_state_dict
from dvtrain.models.vit import DinoVisionTransformer

EXPORT_FORMATS = ("hub", "hf", "safetensors")
HF_CHECK_ATOL = 1e-5


def hub_state_dict(model: DinoVisionTransformer) -> dict[str, torch.Tensor]:
    """The backbone's hub-format state dict: plain keys, fp32, contiguous CPU copies.

    Args:
        model: a DinoVisionTransformer (fully materialised).

    Returns:
        {key: fp32 tensor} with the reference's key names.

    Raises:
        ValueError: a 0-element tensor (ZeRO-3 placeholder) or a key set/shape differing from a
            freshly built model of the same config.
    """
    sd = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        template = DinoVisionTransformer(**_ctor_kwargs(backbone_kwargs(model))).state_dict()
    check_full_shapes(sd, template, "exported backbone")
    return sd


def _ctor_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}


def _export_config(fmt: str, loaded: LoadedBackbone, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": fmt,
        "version": EXPORT_CONFIG_VERSION,
        "which": loaded.which,
        "backbone": kwargs,
        "pos_embed_resampling": resampling_mode(kwargs),
        "provenance": {
            "source_format": loaded.source_format,
            "dvtrain_version": installed_version(),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **{k: v for k, v in loaded.meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
        },
    }


def _prepare_out(out: Path, overwrite: bool, is_dir: bool) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and is_dir:
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)


def export_hub(loaded: LoadedBackbone, out: Path, overwrite: bool = False) -> list[Path]:
    """Write the hub-format state dict to `out` (.pth/.pt) and its config to `out` + ".json".

    Returns:
        [weights path, config path].

    Raises:
        ValueError: wrong suffix, existing output without `overwrite`, placeholders.
    """
    if out.suffix not in (".pth", ".pt"):
        raise ValueError(f"--out for --format hub must be a .pth (or .pt) file, got {out}")
    cfg_path = export_config_path(out)
    _prepare_out(out, overwrite, is_dir=False)
    sd = hub_state_dict(loaded.model)
    kwargs = backbone_kwargs(loaded.model)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    torch.save(sd, tmp)
    os.replace(tmp, out)
    write_json_atomic(cfg_path, _export_config(HUB_FORMAT, loaded, kwargs), sort_keys=True)
    return [out, cfg_path]


def export_safetensors(loaded: LoadedBackbone, out: Path, overwrite: bool = False) -> list[Path]:
    """Write the backbone to `out` (.safetensors) with its config in the metadata and beside it.

    Returns:
        [weights path, config path].

    Raises:
        ValueError: wrong suffix, existing output without `overwrite`, placeholders.
    """
    from safetensors.torch import save_file

    if out.suffix != ".safetensors":
        raise ValueError(f"--out for --format safetensors must be a .safetensors file, got {out}")
    cfg_path = export_config_path(out)
    _prepare_out(out, overwrite, is_dir=False)
    sd = hub_state_dict(loaded.model)
    cfg = _export_config(SAFETENSORS_FORMAT, loaded, backbone_kwargs(loaded.model))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    save_file(sd, str(tmp), metadata={"format": "pt", "dvtrain_config": json.dumps(cfg, sort_keys=True)})
    os.replace(tmp, out)
    write_json_atomic(cfg_path, cfg, sort_keys=True)
    return [out, cfg_path]


def hf_model_classes(config: dict[str, Any]) -> tuple[type, type]:
    """(config class, model class) of transformers for a `to_hf_state_dict` config.

    Raises:
        ValueError: transformers is not installed (pip install 'dvtrain[hf]').
    """
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("--format hf needs the transformers package: pip install 'dvtrain[hf]'") from exc
    if config["model_type"] == "dinov2_with_registers":
        return transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel
    return transformers.Dinov2Config, transformers.Dinov2Model


@torch.no_grad()
def hf_max_abs_diff(
    model: DinoVisionTransformer, hf_model: torch.nn.Module, image_size: int | tuple[int, int], seed: int = 0
) -> float:
    """max |ours - HF| over all final-norm tokens (cls, registers, patches) on one random image.

    Args:
        model: our backbone (eval). hf_model: a transformers Dinov2(WithRegisters)Model (eval).
        image_size: input side (or (H, W)) in pixels, a multiple of the patch size.

    Returns:
        The maximum absolute difference (fp32).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.randn(1, model.patch_embed.proj.in_channels, h, w, generator=torch.Generator().manual_seed(seed))
    x = x.to(next(model.parameters()).device)
    ours = model.forward_features(x)
    ours_seq = torch.cat((ours["x_norm_clstoken"][:, None], ours["x_norm_regtokens"], ours["x_norm_patchtokens"]), dim=1)
    theirs = hf_model.to(x.device)(pixel_values=x).last_hidden_state
    return float((ours_seq.float() - theirs.float()).abs().max())


def export_hf(loaded: LoadedBackbone, out: Path, overwrite: bool = False, verify: bool = True) -> list[Path]:
    """Write a Hugging Face transformers directory and (by default) verify it reloads equal.

    Returns:
        [out directory].

    Raises:
        ValueError: transformers missing, existing output without `overwrite`, a non-square
            position table, placeholders, or the reloaded model differing by more than 1e-5 at
            the training resolution.
    """
    hub_state_dict(loaded.model)  # full-shape / placeholder check
    config, sd = to_hf_state_dict(loaded.model)
    config_cls, model_cls = hf_model_classes(config)
    _prepare_out(out, overwrite, is_dir=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf = model_cls(config_cls(**{k: v for k, v in config.items() if k != "model_type"}))
    hf.load_state_dict(sd, strict=True)
    hf.eval().save_pretrained(str(tmp), safe_serialization=True)
    size = config["image_size"]
    from transformers import BitImageProcessor

    BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": int(round(size * 256 / 224))},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(str(tmp))
    kwargs = backbone_kwargs(loaded.model)
    provenance = _export_config("dvtrain-hf", loaded, kwargs)
    if verify:
        reloaded = model_cls.from_pretrained(str(tmp)).eval()
        diff = hf_max_abs_diff(loaded.model.eval(), reloaded, size)
        if diff > HF_CHECK_ATOL:
            raise ValueError(
                f"the Hugging Face export differs from the backbone by {diff:.3g} at {size} px (> {HF_CHECK_ATOL})"
            )
        provenance["hf_check"] = {"image_size": size, "max_abs_diff": diff}
    note = None
    if (kwargs["interpolate_offset"], kwargs["interpolate_antialias"]) != (0.0, bool(kwargs["num_register_tokens"])):
        note = (
            f"transformers resamples positions with an explicit output size "
            f"(antialias={bool(kwargs['num_register_tokens'])}); "
            f"this backbone uses offset {kwargs['interpolate_offset']} / antialias {kwargs['interpolate_antialias']}: "
            f"outputs are equal at {size} px and differ slightly at other resolutions"
        )
    provenance["resolution_note"] = note
    write_json_atomic(tmp / HF_PROVENANCE_FILE, provenance, sort_keys=True)
    os.replace(tmp, out)
    return [out]


def export_checkpoint(
    checkpoint: str | Path, fmt: str, out: str | Path, which: str = "teacher", overwrite: bool = False
) -> list[Path]:
    """Load the backbone of any supported checkpoint and export it.

    Args:
        checkpoint: anything `dvtrain.checkpoint.backbone.load_backbone` accepts.
        fmt: "hub", "hf" or "safetensors". out: output path (see the module docstring).
        which: "teacher" or "student". overwrite: replace existing outputs.

    Returns:
        The written paths.

    Raises:
        ValueError: unknown format, unsupported checkpoint, placeholders, existing outputs.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    loaded = load_backbone(checkpoint, which=which)
    out = Path(out)
    if fmt == "hub":
        return export_hub(loaded, out, overwrite)
    if fmt == "safetensors":
        return export_safetensors(loaded, out, overwrite)
    return export_hf(loaded, out, overwrite)


def export_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    format: str = typer.Option(
        ..., "--format", "-f", help="hub (.pth + .json), hf (directory) or safetensors (.safetensors + .json)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output file (hub: .pth, safetensors: .safetensors) or directory (hf)."
    ),
    which: str = typer.Option("teacher", "--which", help="teacher or student (training checkpoints)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Export a backbone as a torch.hub state dict, a Hugging Face directory or safetensors.

    Example: dvtrain export --checkpoint runs/vits14/checkpoints --format hf --out vits14-hf
    """
    def _run() -> None:
        paths = export_checkpoint(checkpoint, format, out, which, overwrite)
        for p in paths:
            typer.echo(f"wrote {p}")

    run_user_command(_run)


__all__ = [
    "EXPORT_FORMATS",
    "export_checkpoint",
    "export_command",
    "export_hf",
    "export_hub",
    "export_safetensors",
    "hf_max_abs_diff",
    "hub_state_dict",
]
