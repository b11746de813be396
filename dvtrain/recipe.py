"""Typed training recipes: pydantic models, YAML loading, command-line overrides, derived values.

A recipe is one YAML file validated into :class:`Recipe`. Every field carries its unit in its
description. Values follow facebookresearch/dinov2 (``dinov2/configs/ssl_default_config.yaml`` and
``dinov2/configs/train/vit{l,g}14.yaml``); see ``docs/deviations.md`` for where we differ.

Everything derived from a recipe (global batch, scaled learning rate, iteration counts, the resolved
DeepSpeed config) is computed here, in :class:`Derived` / :func:`derive` and :func:`resolve_ds_config`,
and nowhere else.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dvtrain.models.archs import ARCH_NAMES, ARCH_SPECS

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"

class RecipeError(ValueError):
    """A recipe (file, field or override) is invalid. ``problems`` lists one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------------
# YAML: YAML 1.2 numbers (``1e-4`` is a float) and booleans (only true/false; ``off`` stays a string).
# --------------------------------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema floats and booleans.

    PyYAML implements YAML 1.1, where ``1e-4`` (no dot) is a *string* and ``on``/``off``/``yes``/``no``
    are booleans. Recipes are written by people who expect ``lr: 1e-4`` to be 0.0001 and
    ``mode: offline`` / ``mode: off`` to be strings.
    """


_RecipeLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the recipe loader (YAML 1.2 floats and booleans).

    Raises:
        RecipeError: a syntax error, naming ``source`` and the line/column.
    """
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{source}:{where}: YAML syntax error: {problem}"]) from None


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Backbone (``dinov2/models/vision_transformer.py``)."""

    arch: Literal[(*ARCH_NAMES, "from_init")] = Field(  # type: ignore[valid-type] - dvtrain.models.archs names
        "vit_small",
        description="Backbone size: widths/depths/heads of the reference (vit_tiny: 192/12/3); from_init = the "
        "architecture of model.init_from (patch, width, depth, heads, FFN, registers, position resampling).",
    )
    init_from: str | None = Field(
        None,
        description="Start from these weights (student and teacher): a dinov2 hub or training checkpoint, a Hugging "
        "Face Dinov2 directory, a dvtrain export (.pth/.safetensors) or a dvtrain run directory (also its heads). "
        "Ignored when the run resumes its own checkpoint.",
    )
    mlp_ratio: float | None = Field(None, gt=0.0, description="Override of the FFN hidden size / width (4); null = arch.")
    patch_size: int = Field(14, ge=1, description="Patch side in pixels (14 for released models, 16 for IN-1k).")
    embed_dim: int | None = Field(None, ge=8, description="Override of the arch's width (channels); null = arch.")
    depth: int | None = Field(None, ge=1, description="Override of the arch's number of blocks; null = arch.")
    num_heads: int | None = Field(None, ge=1, description="Override of the arch's attention heads; null = arch.")
    ffn_layer: Literal["mlp", "swiglu"] = Field("mlp", description="FFN type; swiglu uses the fused kernel on CUDA.")
    num_register_tokens: int = Field(0, ge=0, description="Register tokens (0 or 4 in the papers); count.")
    drop_path_rate: float = Field(0.3, ge=0.0, lt=1.0, description="Stochastic depth rate, uniform over blocks.")
    layerscale_init: float | None = Field(1e-5, description="LayerScale gamma init; null disables LayerScale.")
    interpolate_offset: float = Field(0.1, ge=0.0, description="Pos-embed resampling offset (0.1 plain, 0 registers).")
    interpolate_antialias: bool = Field(False, description="Antialias in pos-embed resampling (true for registers).")
    attn_impl: Literal["auto", "sdpa", "xformers", "math"] = Field(
        "auto", description="Attention kernel: auto = xformers on CUDA when installed, else SDPA."
    )
    activation_checkpointing: bool = Field(False, description="Recompute each block in backward (saves memory).")
    compile: bool = Field(
        False, description="torch.compile each transformer block's forward (student and teacher). Steady-state step "
        "0.80-0.95x on the smoke recipe (2 CPU cores), but the first compile (8-60 s) eats that in a 5-minute run; "
        "on for long runs (benchmarks/results/2026-12-01-step-vs-reference-cpu.md).",
    )


class CropsConfig(_Section):
    """Multi-crop augmentation (``dinov2/data/augmentations.py``)."""

    global_size: int = Field(224, ge=1, description="Global crop side, pixels; a multiple of model.patch_size.")
    local_size: int = Field(98, ge=1, description="Local crop side, pixels; a multiple of model.patch_size.")
    num_local_crops: int = Field(8, ge=0, description="Local crops per image; count.")
    global_scale: tuple[float, float] = Field((0.32, 1.0), description="RandomResizedCrop area fraction range.")
    local_scale: tuple[float, float] = Field((0.05, 0.32), description="RandomResizedCrop area fraction range.")
    blur: Literal["reference", "paper"] = Field(
        "reference",
        description="Blur probabilities: reference = what released models saw (global 1 never, global 2 0.9, "
        "locals 0.5; dinov2#411); paper = written intent (1.0 / 0.1 / 0.5).",
    )


class MaskingConfig(_Section):
    """iBOT block masking (``dinov2/data/masking.py``, ``dinov2/data/collate.py``)."""

    sample_probability: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of global crops that are masked.")
    ratio_min_max: tuple[float, float] = Field((0.1, 0.5), description="Masked-patch fraction range, stratified.")
    min_num_patches: int = Field(4, ge=1, description="Smallest block, patches.")
    min_aspect: float = Field(0.3, gt=0.0, le=1.0, description="Block aspect ratio range [min_aspect, 1/min_aspect].")


class LossConfig(_Section):
    """Heads and loss terms (``dinov2/loss/``, ``dinov2/train/ssl_meta_arch.py``)."""

    dino_weight: float = Field(1.0, ge=0.0, description="Weight of the DINO (CLS) loss terms.")
    ibot_weight: float = Field(1.0, ge=0.0, description="Weight of the iBOT masked-patch loss.")
    koleo_weight: float = Field(0.1, ge=0.0, description="KoLeo weight, applied to each global crop and summed.")
    num_prototypes: int = Field(65536, ge=2, description="DINO head output size (prototypes).")
    bottleneck_dim: int = Field(256, ge=1, description="DINO head bottleneck width.")
    head_hidden_dim: int = Field(2048, ge=1, description="DINO head MLP width.")
    head_nlayers: int = Field(3, ge=1, description="DINO head MLP layers.")
    ibot_separate_head: bool = Field(False, description="Separate iBOT head (L14/g14 recipes) instead of sharing.")
    ibot_num_prototypes: int = Field(65536, ge=2, description="iBOT head prototypes when separate.")
    ibot_bottleneck_dim: int = Field(256, ge=1, description="iBOT head bottleneck width when separate.")
    ibot_hidden_dim: int = Field(2048, ge=1, description="iBOT head MLP width when separate.")
    centering: Literal["centering", "sinkhorn_knopp"] = Field(
        "centering", description="Teacher targets: softmax with EMA center, or 3 Sinkhorn-Knopp iterations."
    )
    center_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of the teacher center.")
    student_temp: float = Field(0.1, gt=0.0, description="Student softmax temperature.")


class OptimConfig(_Section):
    """AdamW, schedules and parameter groups (``dinov2/train/train.py``, ``dinov2/utils/param_groups.py``)."""

    base_lr: float = Field(0.004, gt=0.0, description="Learning rate at the reference batch (1024 images).")
    lr_scaling: Literal["sqrt", "linear", "none"] = Field(
        "sqrt", description="lr = base_lr * (global_batch / lr_reference_batch) ** {0.5, 1, 0}."
    )
    lr_reference_batch: int = Field(1024, ge=1, description="Global batch at which base_lr applies; images.")
    warmup_epochs: float = Field(10, ge=0.0, description="Linear lr warmup from 0; epochs.")
    min_lr: float = Field(1e-6, ge=0.0, description="Final lr of the cosine decay.")
    weight_decay: float = Field(0.04, ge=0.0, description="Weight decay at iteration 0 (cosine schedule start).")
    weight_decay_end: float = Field(0.4, ge=0.0, description="Weight decay at the last iteration.")
    layerwise_decay: float = Field(0.9, gt=0.0, le=1.0, description="Layer-wise lr decay; 1.0 = off.")
    patch_embed_lr_mult: float = Field(0.2, ge=0.0, description="lr multiplier of the patch embedding.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    clip_grad: float = Field(3.0, ge=0.0, description="Gradient-norm clip; 0 disables.")
    clip_mode: Literal["per_module", "global"] = Field(
        "per_module",
        description="per_module = reference (backbone, DINO head, iBOT head each clipped); global = one norm.",
    )
    freeze_last_layer_epochs: float = Field(1, ge=0.0, description="Heads' last layer has lr 0 this long; epochs.")
    freeze_backbone_iterations: int = Field(
        0, ge=0, description="Backbone lr and weight decay are exactly 0 (student and teacher backbone fixed) while "
        "the heads warm up; iterations. For fresh heads on a model.init_from backbone."
    )
    backbone_warmup_iterations: int | None = Field(
        None, ge=0, description="After the freeze, the backbone lr rises linearly from 0 over this many iterations; "
        "null = freeze_backbone_iterations."
    )
    max_consecutive_skipped_steps: int = Field(
        50, ge=1, description="fp16: abort after this many consecutive overflow-skipped steps."
    )
    max_nonfinite_losses: int = Field(5, ge=1, description="bf16/fp32: abort after this many non-finite losses.")


class TeacherConfig(_Section):
    """EMA teacher (``dinov2/train/train.py`` schedulers)."""

    momentum_start: float = Field(0.992, ge=0.0, le=1.0, description="EMA momentum at iteration 0.")
    momentum_end: float = Field(1.0, ge=0.0, le=1.0, description="EMA momentum at the last iteration (cosine).")
    temp_warmup_start: float = Field(0.04, gt=0.0, description="Teacher temperature at iteration 0.")
    temp: float = Field(0.07, gt=0.0, description="Teacher temperature after the warmup.")
    temp_warmup_epochs: float = Field(30, ge=0.0, description="Linear teacher-temperature warmup; epochs.")


class DistillConfig(_Section):
    """Distillation from a frozen, larger teacher (DINOv2 paper section 5); off while ``teacher`` is null."""

    teacher: str | None = Field(
        None, description="Frozen teacher: a dvtrain run directory (backbone + DINO/iBOT heads) or any backbone "
        "checkpoint model.init_from accepts. The recipe's model is the student."
    )
    objective: Literal["auto", "heads", "features"] = Field(
        "auto", description="heads = the teacher's DINO/iBOT head outputs are the targets of the student's own heads "
        "(the paper); features = CLS and patch features through learned projections; auto = heads when the "
        "teacher has heads."
    )
    feature_loss: Literal["cosine", "mse"] = Field(
        "cosine", description="features objective: 1 - cosine similarity (default) or MSE of normalised features."
    )
    cls_weight: float = Field(1.0, ge=0.0, description="features objective: weight of the CLS-token term.")
    patch_weight: float = Field(1.0, ge=0.0, description="features objective: weight of the patch-token term.")


class ScheduleConfig(_Section):
    """Run length. An "epoch" is a unit of iterations only (the reference's OFFICIAL_EPOCH_LENGTH)."""

    epochs: float = Field(100, gt=0.0, description="Run length; epochs.")
    iterations_per_epoch: int = Field(1250, ge=1, description="Optimizer steps per epoch; iterations.")


class BatchConfig(_Section):
    """Batch sizes."""

    micro_batch_per_device: int = Field(64, ge=1, description="Images per rank per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")


class ZeroConfig(_Section):
    """DeepSpeed ZeRO settings; tuning values come from the template in ``ds_configs/``."""

    stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage (3 = parameters, gradients, optimizer sharded).")
    offload: Literal["none", "cpu"] = Field("none", description="Optimizer (and ZeRO-3 parameter) offload target.")
    config: str | None = Field(
        None,
        description="DeepSpeed template (path, relative to the repo or absolute); null = picked by stage, "
        "offload and precision.",
    )


class DataConfig(_Section):
    """Training data: MDS shards written by ``dvtrain data convert``."""

    path: str = Field("data/mds/train", description="MDS location: a local directory or s3://, gs://, ... URL.")
    cache_dir: str | None = Field(None, description="Local cache for a remote location; null = a temp dir.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    shuffle: bool = Field(True, description="Shuffle samples (seeded by `seed`).")


class WandbConfig(_Section):
    """Weights & Biases logging."""

    project: str = Field("dvtrain", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); null = the API key's default.")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online when an API key is configured, else offline."
    )
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    log_every: int = Field(10, ge=1, description="Log metrics every this many iterations.")
    image_every: int = Field(0, ge=0, description="Log crop grids and PCA pictures every N iterations; 0 = end only.")


class CheckpointConfig(_Section):
    """Checkpoints (written atomically under ``<output_dir>/checkpoints`` unless ``dir`` is set)."""

    dir: str | None = Field(None, description="Checkpoint directory; null = <output_dir>/checkpoints.")
    every: int = Field(1000, ge=1, description="Save every this many iterations (and at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")


class EvalConfig(_Section):
    """k-NN evaluation of the teacher after training (DINOv2 protocol, ``dinov2/eval/knn.py``)."""

    train_path: str | None = Field(None, description="MDS shards of the k-NN bank (labelled); null = skip.")
    val_path: str | None = Field(None, description="MDS shards of the labelled queries; null = skip.")
    bank_size: int | None = Field(None, ge=1, description="Use the first N bank images; null = all.")
    ks: list[int] = Field(default_factory=lambda: [10, 20, 100, 200], description="Neighbour counts.")
    temperature: float = Field(0.07, gt=0.0, description="Softmax temperature of the vote weights.")
    image_size: int | None = Field(None, ge=1, description="Eval resize side, pixels; null = crops.global_size.")


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------


def nearest_multiples(size: int, multiple: int) -> list[int]:
    """Valid sizes near ``size``: the nearest multiple of ``multiple``, plus the other neighbour when it
    lies within 10 % of ``size`` (96 with patch 14 -> [98]; 320 -> [308, 322])."""
    lo, hi = (size // multiple) * multiple, (size // multiple + 1) * multiple
    cands = [c for c in (lo, hi) if c > 0]
    best = min(cands, key=lambda c: (abs(c - size), c))
    return sorted({best, *[c for c in cands if abs(c - size) <= 0.1 * size]})


class Recipe(BaseModel):
    """A complete, validated training recipe. Load with :func:`load_recipe`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    name: str = Field("run", description="Run name (W&B run name, default output directory name).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    precision: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Training precision.")
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = Field(0, ge=0, description="Seed of every RNG (per rank offset by rank).")

    @model_validator(mode="after")
    def _cross_field(self) -> "Recipe":
        problems: list[str] = []
        p = self.model.patch_size
        for fld in ("global_size", "local_size"):
            size = getattr(self.crops, fld)
            if fld == "local_size" and self.crops.num_local_crops == 0:
                continue
            if size % p:
                use = " or ".join(str(c) for c in nearest_multiples(size, p))
                problems.append(
                    f"crops.{fld}={size} is not a multiple of model.patch_size={p}: use {use}"
                )
        for fld in ("global_scale", "local_scale"):
            lo, hi = getattr(self.crops, fld)
            if not 0.0 < lo <= hi <= 1.0:
                problems.append(f"crops.{fld}=({lo}, {hi}) must satisfy 0 < min <= max <= 1")
        lo, hi = self.masking.ratio_min_max
        if not 0.0 <= lo <= hi < 1.0:
            problems.append(f"masking.ratio_min_max=({lo}, {hi}) must satisfy 0 <= min <= max < 1")
        if self.teacher.momentum_start > self.teacher.momentum_end:
            problems.append(
                f"teacher.momentum_start={self.teacher.momentum_start} exceeds "
                f"teacher.momentum_end={self.teacher.momentum_end}: the momentum schedule rises to the end value"
            )
        for path, warmup in (("optim.warmup_epochs", self.optim.warmup_epochs),
                             ("teacher.temp_warmup_epochs", self.teacher.temp_warmup_epochs)):
            if warmup > self.schedule.epochs:  # a warmup must end within the run
                problems.append(
                    f"{path}={warmup} exceeds schedule.epochs={self.schedule.epochs}: a warmup must end within "
                    f"the run, use {path} <= {self.schedule.epochs}"
                )
        if self.loss.koleo_weight > 0 and self.batch.micro_batch_per_device < 2:
            problems.append(
                f"batch.micro_batch_per_device={self.batch.micro_batch_per_device}: KoLeo needs a nearest "
                "neighbour in the per-rank batch, use >= 2 (or set loss.koleo_weight=0)"
            )
        if self.zero.offload != "none" and self.zero.stage == 0:
            problems.append(f"zero.offload={self.zero.offload} needs zero.stage >= 1")
        o, z = self.optim, self.zero
        if o.clip_mode == "per_module" and o.clip_grad > 0:
            problem = per_module_clipping_problem(z.stage, self.precision, z.offload != "none")
            if problem:
                problems.append(problem)
        if self.model.arch == "from_init":
            if not self.model.init_from:
                problems.append("model.arch=from_init needs model.init_from (the checkpoint whose architecture to use)")
        else:
            width = self.model.embed_dim or ARCH_SPECS[self.model.arch]["embed_dim"]
            heads = self.model.num_heads or ARCH_SPECS[self.model.arch]["num_heads"]
            if width % heads:
                problems.append(f"model.embed_dim={width} is not divisible by model.num_heads={heads}")
        dc = self.distill
        if not dc.teacher and dc.objective != "auto":
            problems.append(f"distill.objective={dc.objective} needs distill.teacher (the frozen teacher's checkpoint)")
        if dc.teacher and dc.cls_weight == 0 and dc.patch_weight == 0 and dc.objective == "features":
            problems.append("distill.cls_weight and distill.patch_weight are both 0: the features objective trains nothing")
        total = int(round(self.schedule.epochs * self.schedule.iterations_per_epoch))
        if self.optim.freeze_backbone_iterations >= total > 0 and self.optim.freeze_backbone_iterations:
            problems.append(
                f"optim.freeze_backbone_iterations={self.optim.freeze_backbone_iterations} is not below the run's "
                f"{total} iterations: the backbone would never train"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------------------------------


class Derived(BaseModel):
    """Values computed from a recipe and the world size (the one place they are computed)."""

    model_config = ConfigDict(frozen=True)

    world_size: int = Field(description="Ranks (processes) in the run.")
    global_batch: int = Field(description="Images per optimizer step over all ranks.")
    lr: float = Field(description="Peak learning rate after scaling base_lr by the global batch.")
    total_iterations: int = Field(description="Optimizer steps in the run.")
    warmup_iterations: int = Field(description="Linear lr warmup length; iterations.")
    freeze_last_layer_iterations: int = Field(description="Heads' last layer frozen while iteration < this.")
    teacher_temp_warmup_iterations: int = Field(description="Teacher-temperature warmup length; iterations.")
    global_crop_tokens: int = Field(description="Patch tokens of a global crop.")
    local_crop_tokens: int = Field(description="Patch tokens of a local crop.")


def scaled_lr(base_lr: float, global_batch: int, rule: str, reference_batch: int = 1024) -> float:
    """Learning-rate scaling (``dinov2/train/train.py``: ``lr *= sqrt(batch * world / 1024)``).

    Args:
        base_lr: lr at ``reference_batch`` images per step.
        global_batch: images per optimizer step over all ranks.
        rule: ``sqrt`` (reference), ``linear`` or ``none``.
    """
    ratio = global_batch / reference_batch
    return base_lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[rule]


def derive(recipe: Recipe, world_size: int = 1) -> Derived:
    """Compute the derived values of ``recipe`` for ``world_size`` ranks.

    Raises:
        ValueError: ``world_size < 1``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ipe = recipe.schedule.iterations_per_epoch
    gb = recipe.batch.micro_batch_per_device * recipe.batch.grad_accum_steps * world_size
    p = recipe.model.patch_size
    return Derived(
        world_size=world_size,
        global_batch=gb,
        lr=scaled_lr(recipe.optim.base_lr, gb, recipe.optim.lr_scaling, recipe.optim.lr_reference_batch),
        total_iterations=int(round(recipe.schedule.epochs * ipe)),
        warmup_iterations=int(round(recipe.optim.warmup_epochs * ipe)),
        freeze_last_layer_iterations=int(round(recipe.optim.freeze_last_layer_epochs * ipe)),
        teacher_temp_warmup_iterations=int(round(recipe.teacher.temp_warmup_epochs * ipe)),
        global_crop_tokens=(recipe.crops.global_size // p) ** 2,
        local_crop_tokens=(recipe.crops.local_size // p) ** 2,
    )


# Keys of a DeepSpeed config that the recipe owns; a template that sets them is an error.
_RECIPE_OWNED = {
    "train_batch_size": "batch.* and the world size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_per_device",
    "gradient_accumulation_steps": "batch.grad_accum_steps",
    "gradient_clipping": "optim.clip_grad / optim.clip_mode",
    "fp16.enabled": "precision",
    "bf16.enabled": "precision",
    "zero_optimization.stage": "zero.stage",
    "zero_optimization.offload_optimizer": "zero.offload",
    "zero_optimization.offload_param": "zero.offload",
    "optimizer": "optim.* (dvtrain builds AdamW with the DINOv2 parameter groups)",
    "scheduler": "optim.* (dvtrain applies its per-iteration schedules)",
}


def default_ds_template(recipe: Recipe) -> Path:
    """The template picked when ``zero.config`` is null: by offload, stage and precision."""
    if recipe.zero.offload != "none":
        name = "zero3_offload.json" if recipe.zero.stage == 3 else "zero2_offload.json"
    elif recipe.zero.stage == 3:
        name = "zero3_bf16.json" if recipe.precision == "bf16" else "zero3_fp16.json"
    else:
        name = "zero2.json"
    return DS_CONFIG_DIR / name


def ds_template_path(recipe: Recipe) -> Path:
    """Absolute path of the recipe's DeepSpeed template (relative paths: repo root, then cwd)."""
    if recipe.zero.config is None:
        return default_ds_template(recipe)
    path = Path(recipe.zero.config)
    if not path.is_absolute():
        for base in (Path.cwd(), REPO_ROOT):
            if (base / path).exists():
                return (base / path).resolve()
    return path


def resolve_ds_config(recipe: Recipe, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config of a run: the template with every recipe-owned value filled in.

    Args:
        recipe: a validated recipe.
        world_size: ranks in the run.

    Returns:
        A JSON-able dict to pass to ``deepspeed.initialize(config=...)``.

    Raises:
        RecipeError: the template is missing, not JSON, or sets a value the recipe owns.
    """
    path = ds_template_path(recipe)
    if not path.exists():
        raise RecipeError([f"zero.config: DeepSpeed template {path} does not exist (see ds_configs/)"])
    try:
        tmpl = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError([f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}"]) from None
    problems = []
    for dotted, owner in _RECIPE_OWNED.items():
        node: Any = tmpl
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            problems.append(f"{path}: '{dotted}' is set by the recipe ({owner}); remove it from the template")
    if problems:
        raise RecipeError(problems)

    d = derive(recipe, world_size)
    cfg = copy.deepcopy(tmpl)
    cfg.pop("_comment", None)
    cfg["train_micro_batch_size_per_gpu"] = recipe.batch.micro_batch_per_device
    cfg["gradient_accumulation_steps"] = recipe.batch.grad_accum_steps
    cfg["train_batch_size"] = d.global_batch
    # Per-module clipping (the reference) happens in dvtrain; DeepSpeed clips only in global mode.
    cfg["gradient_clipping"] = recipe.optim.clip_grad if recipe.optim.clip_mode == "global" else 0.0
    cfg.setdefault("fp16", {})["enabled"] = recipe.precision == "fp16"
    cfg.setdefault("bf16", {})["enabled"] = recipe.precision == "bf16"
    if recipe.precision != "fp16":
        cfg["fp16"] = {"enabled": False}
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = recipe.zero.stage
    if recipe.zero.offload != "none":
        zero["offload_optimizer"] = {"device": recipe.zero.offload, "pin_memory": False}
        if recipe.zero.stage == 3:
            zero["offload_param"] = {"device": recipe.zero.offload, "pin_memory": False}
    if recipe.zero.stage < 3:
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
    return cfg


# --------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------


def _field_paths(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model_cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(_field_paths(ann, f"{prefix}{name}."))
        else:
            paths.append(f"{prefix}{name}")
    return paths


RECIPE_PATHS: tuple[str, ...] = tuple(_field_paths(Recipe))


def close_paths(key: str, n: int = 3) -> list[str]:
    """Recipe field paths that resemble ``key`` (a typo, or a field under the wrong section)."""
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {p: p.rsplit(".", 1)[-1] for p in RECIPE_PATHS}
    same_section = [p for p in RECIPE_PATHS if p.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]]
    hits = difflib.get_close_matches(key, same_section or RECIPE_PATHS, n=n, cutoff=0.85)
    for leaf_hit in difflib.get_close_matches(leaf, list(set(by_leaf.values())), n=n, cutoff=0.75):
        hits += [p for p, lf in by_leaf.items() if lf == leaf_hit and p not in hits]
    return hits[:n]


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``1e-4`` is a float).

    Raises:
        RecipeError: malformed override or unknown path (with close matches).
    """
    if "=" not in override:
        raise RecipeError([f"--set {override!r}: expected dotted.path=value, e.g. optim.base_lr=2e-4"])
    key, raw = override.split("=", 1)
    key = key.strip().lstrip("-")
    if key not in RECIPE_PATHS:
        close = close_paths(key)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `dvtrain show RECIPE` lists the fields"
        raise RecipeError([f"--set {key}: unknown recipe field{hint}"])
    value = parse_yaml(raw, source=f"--set {key}") if raw.strip() else None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _format_validation_error(exc: ValidationError, source: str) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            for part in msg[len("Value error, "):].split("; "):
                problems.append(f"{source}: {part}")
            continue
        if err["type"] == "extra_forbidden":
            close = close_paths(loc)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{source}: {loc}: unknown field{hint}")
            continue
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{source}: {loc or '<top level>'}: {msg}{got_s}")
    return problems


def recipe_from_dict(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a parsed recipe mapping.

    Raises:
        RecipeError: every problem, each naming ``source`` and the field path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}: a recipe is a YAML mapping of sections, got {type(data).__name__}"])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, source)) from None
    if recipe.model.arch == "from_init":
        from dvtrain.models.init_from import resolve_arch_from_init  # noqa: PLC0415 - reads checkpoint metadata

        try:
            resolved = resolve_arch_from_init(recipe)
        except ValueError as exc:
            raise RecipeError([f"{source}: model.arch=from_init: {exc}"]) from None
        return recipe_from_dict(resolved.model_dump(mode="json"), source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override and validate a recipe file.

    Args:
        path: YAML file.
        overrides: ``dotted.path=value`` strings applied in order (``--set``).

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: missing file, YAML syntax error (with line), unknown field, wrong type, or a
            cross-field rule; the message names the file and each field.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    data = parse_yaml(path.read_text(), source=str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping of sections, got {type(data).__name__}"])
    for ov in overrides:
        apply_override(data, ov)
    src = str(path) + (" with --set " + " ".join(overrides) if overrides else "")
    return recipe_from_dict(data, source=src)


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML (every field, defaults included); ``load_recipe`` reads it back identically."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Advice on the machine a recipe runs on (warnings, not errors: the recipe stays valid)
# --------------------------------------------------------------------------------------------------


def per_module_clipping_problem(zero_stage: int, precision: str, offload: bool) -> str | None:
    """The one rule for where per-module gradient clipping (the reference's) can run, or None when it can.

    dvtrain clips each student module itself from the partitioned gradients: that needs ZeRO-3 without
    offload (gradients in DeepSpeed's partitioned fp32 buffers), or stage 0 in fp32 (plain gradients);
    ZeRO-1/2 and half-precision stage 0 keep gradients where dvtrain cannot clip per module.
    Checked by the recipe (before anything starts) and by ``dvtrain.train.engine.ShardedTeacherEngine``.

    Args:
        zero_stage: 0-3. precision: fp32 | bf16 | fp16. offload: optimizer state offloaded to the CPU.

    Returns:
        A one-line problem naming the fields and the fix, or None.
    """
    if (zero_stage == 3 or (zero_stage == 0 and precision == "fp32")) and not offload:
        return None
    return (f"optim.clip_mode=per_module needs zero.stage=3 without offload (or stage 0 in fp32), got stage "
            f"{zero_stage}, offload {'cpu' if offload else 'none'}, {precision}: use optim.clip_mode=global")


def precision_advice(recipe: Recipe, cuda_available: bool | None = None, cuda_bf16: bool | None = None) -> str | None:
    """One warning when ``recipe.precision`` is a poor fit for this machine, else None.

    - ``fp16`` without a CUDA device: CPUs without fp16 matrix units run fp16 GEMMs in software (one
      512 x 512 fp16 matmul took ~200x the bf16 time on the project's AMD EPYC; whole training steps of
      the shipped recipes ran at about a quarter of bf16's speed), and DeepSpeed's dynamic loss scale
      starts at 2^16 and settles by skipping optimizer steps (the iteration count stands still
      meanwhile). Suggests bf16.
    - ``bf16`` on a CUDA device without native bf16 (compute capability < 8.0, e.g. V100/T4): suggests
      fp16.

    Args:
        recipe: a validated recipe.
        cuda_available: whether a CUDA device is present; None = ``torch.cuda.is_available()``.
        cuda_bf16: whether that device computes bf16 natively; None = ask torch (only when CUDA is present).

    Returns:
        The warning text (one line, naming ``precision`` and the override to use), or None.
    """
    if recipe.precision not in ("fp16", "bf16"):
        return None
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if recipe.precision == "fp16" and not cuda_available:
        return ("precision=fp16 without a CUDA device: fp16 runs about 4x slower than bf16 on CPU (no fp16 "
                "matrix units) and the fp16 loss scale settles by skipping the first steps; use "
                "--set precision=bf16 (or fp32 on a CPU without bf16 support)")
    if recipe.precision == "bf16" and cuda_available:
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if not cuda_bf16:
            return ("precision=bf16 on a CUDA device without native bf16 (compute capability < 8.0): bf16 is "
                    "emulated there; use --set precision=fp16")
    return None
