"""FLOPs accounting and model FLOPs utilisation (MFU), nanoGPT-style: an explicit formula.

Counts multiply-adds of the matmuls (x2 for FLOPs); softmax, norms, activations and the EMA are
ignored (<2 % at the sizes that matter). A training image costs

    student: 3 x forward (forward + backward = 2 x forward) over 2 global + n local crops, with the
             DINO head on every crop's CLS token and the iBOT head on the masked global patch tokens
    teacher: 1 x forward over the 2 global crops with its DINO head on both CLS tokens and its iBOT
             head on the masked patch tokens

following the passes of ``dinov2/train/ssl_meta_arch.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ViTShape:
    """Sizes needed to count a ViT's FLOPs."""

    embed_dim: int
    depth: int
    ffn_hidden: int
    ffn_layer: str  # "mlp" | "swiglu"
    patch_size: int
    num_register_tokens: int = 0
    in_chans: int = 3


@dataclass(frozen=True)
class HeadShape:
    """Sizes of a DINO head: MLP widths and the prototype count."""

    in_dim: int
    hidden_dim: int
    bottleneck_dim: int
    num_prototypes: int
    nlayers: int = 3


def vit_forward_flops(shape: ViTShape, image_size: int) -> int:
    """FLOPs of one backbone forward on one square image of side ``image_size`` pixels.

    Returns:
        FLOPs (2 x multiply-adds) as an int.
    """
    d, p = shape.embed_dim, shape.patch_size
    n_patch = (image_size // p) ** 2
    t = 1 + shape.num_register_tokens + n_patch
    macs = n_patch * shape.in_chans * p * p * d  # patch embedding
    per_block = 4 * d * d * t  # qkv (3) + output projection (1)
    per_block += 2 * t * t * d  # q @ k^T and attn @ v
    ffn_mats = 3 if shape.ffn_layer == "swiglu" else 2
    per_block += ffn_mats * d * shape.ffn_hidden * t
    macs += shape.depth * per_block
    return 2 * macs


def head_flops(head: HeadShape, tokens: int) -> int:
    """FLOPs of a DINO head on ``tokens`` input vectors."""
    dims = [head.in_dim] + [head.hidden_dim] * (head.nlayers - 1) + [head.bottleneck_dim]
    macs = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + head.bottleneck_dim * head.num_prototypes
    return 2 * macs * tokens


def train_flops_per_image(
    backbone: ViTShape,
    dino_head: HeadShape,
    ibot_head: HeadShape | None,
    global_size: int,
    local_size: int,
    num_local_crops: int,
    masked_fraction: float = 0.15,
) -> int:
    """FLOPs of one image in one DINOv2 training step (student fwd+bwd, teacher fwd, heads).

    Args:
        ibot_head: the separate iBOT head, or None when it shares the DINO head.
        masked_fraction: expected fraction of a global crop's patches that are masked (0.5 of the crops
            are masked with a ratio uniform in [0.1, 0.5]: 0.15 on average).
    """
    student_fwd, teacher_fwd = ssl_forward_flops(backbone, dino_head, ibot_head, global_size, local_size,
                                                 num_local_crops, masked_fraction)
    return 3 * student_fwd + teacher_fwd


def ssl_forward_flops(
    backbone: ViTShape, dino_head: HeadShape, ibot_head: HeadShape | None, global_size: int, local_size: int,
    num_local_crops: int, masked_fraction: float = 0.15,
) -> tuple[int, int]:
    """(student forward, teacher forward) FLOPs of one image; the student's training cost is 3 x its forward.

    The teacher term is the forward of a teacher shaped by ``backbone`` / heads on the 2 global crops, so
    it also counts a distillation teacher when called with the teacher's shapes.
    """
    ibot = ibot_head or dino_head
    g_fwd = vit_forward_flops(backbone, global_size)
    l_fwd = vit_forward_flops(backbone, local_size) if num_local_crops else 0
    masked_tokens = masked_fraction * 2 * (global_size // backbone.patch_size) ** 2
    student_fwd = 2 * g_fwd + num_local_crops * l_fwd
    student_fwd += head_flops(dino_head, 2 + num_local_crops) + head_flops(ibot, int(round(masked_tokens)))
    teacher_fwd = 2 * g_fwd + head_flops(dino_head, 2) + head_flops(ibot, int(round(masked_tokens)))
    return student_fwd, teacher_fwd


def vit_shape_from_kwargs(kwargs: dict) -> ViTShape:
    """:class:`ViTShape` of ``DinoVisionTransformer`` constructor arguments (``checkpoint.backbone.backbone_kwargs``)."""
    from dvtrain.models.layers import swiglu_hidden_dim

    d = int(kwargs["embed_dim"])
    hidden = int(d * float(kwargs.get("mlp_ratio", 4.0)))
    if kwargs.get("ffn_layer", "mlp") == "swiglu":
        hidden = swiglu_hidden_dim(hidden)
    return ViTShape(d, int(kwargs["depth"]), hidden, kwargs.get("ffn_layer", "mlp"), int(kwargs["patch_size"]),
                    int(kwargs.get("num_register_tokens", 0)), int(kwargs.get("in_chans", 3)))


def _count(module_fn) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_fn().parameters())


def model_summary(recipe, world_size: int = 1) -> list[dict]:
    """Parameter counts and training FLOPs per step of each network a recipe runs (``dvtrain show``).

    Rows: the student (trained: 3 x forward per image), and the teacher: the EMA copy of the student
    (pretraining: one forward on the 2 global crops) or the frozen ``distill.teacher`` (distillation:
    one forward on the 2 global crops; its shapes from the checkpoint's metadata, no weights read).

    Args:
        recipe: validated Recipe. world_size: ranks (the global batch multiplies per-image FLOPs).

    Returns:
        list of {"network", "parameters", "flops_per_image", "flops_per_step"}.
    """
    from dvtrain.checkpoint.backbone import backbone_template, read_backbone_config
    from dvtrain.models.heads import DINOHead
    from dvtrain.models.vit import DinoVisionTransformer
    from dvtrain.recipe import derive

    gb = derive(recipe, world_size).global_batch
    lo, c = recipe.loss, recipe.crops
    kw, _ = backbone_template(recipe)
    s_shape = vit_shape_from_kwargs(kw)
    frac = recipe.masking.sample_probability * sum(recipe.masking.ratio_min_max) / 2

    def heads(loss, dim):
        dino = HeadShape(dim, loss.head_hidden_dim, loss.bottleneck_dim, loss.num_prototypes, loss.head_nlayers)
        ibot = (HeadShape(dim, loss.ibot_hidden_dim, loss.ibot_bottleneck_dim, loss.ibot_num_prototypes,
                          loss.head_nlayers) if loss.ibot_separate_head else None)
        return dino, ibot

    def head_params(h):
        return 0 if h is None else _count(lambda: DINOHead(h.in_dim, h.num_prototypes, h.hidden_dim, h.bottleneck_dim,
                                                           h.nlayers))

    backbone_params = _count(lambda: DinoVisionTransformer(**{k: (tuple(v) if isinstance(v, list) else v)
                                                              for k, v in kw.items()}))
    rows = []
    if not recipe.distill.teacher:
        dino, ibot = heads(lo, s_shape.embed_dim)
        s_fwd, t_fwd = ssl_forward_flops(s_shape, dino, ibot, c.global_size, c.local_size, c.num_local_crops, frac)
        n = backbone_params + head_params(dino) + head_params(ibot)
        rows.append({"network": "student", "parameters": n, "flops_per_image": 3 * s_fwd})
        rows.append({"network": "teacher (EMA of the student)", "parameters": n, "flops_per_image": t_fwd})
    else:
        from dvtrain.train.distill import _teacher_recipe, distill_objective

        objective = distill_objective(recipe)
        t_kw, _ = read_backbone_config(recipe.distill.teacher)
        t_shape = vit_shape_from_kwargs(t_kw)
        t_backbone = _count(lambda: DinoVisionTransformer(**{k: (tuple(v) if isinstance(v, list) else v)
                                                             for k, v in t_kw.items()}))
        if objective == "heads":
            dino, ibot = heads(lo, s_shape.embed_dim)
            s_fwd, _ = ssl_forward_flops(s_shape, dino, ibot, c.global_size, c.local_size, c.num_local_crops, frac)
            t_dino, t_ibot = heads(_teacher_recipe(recipe.distill.teacher).loss, t_shape.embed_dim)
            _, t_fwd = ssl_forward_flops(t_shape, t_dino, t_ibot, c.global_size, c.local_size, 0, frac)
            s_params = backbone_params + head_params(dino) + head_params(ibot)
            t_params = t_backbone + head_params(t_dino) + head_params(t_ibot)
        else:
            n_s = (c.global_size // s_shape.patch_size) ** 2
            proj = 2 * s_shape.embed_dim * t_shape.embed_dim * (1 + n_s)  # cls + patch projections, per crop
            s_fwd = 2 * (vit_forward_flops(s_shape, c.global_size) + proj)
            t_fwd = 2 * vit_forward_flops(t_shape, c.global_size)
            s_params = backbone_params + 2 * (s_shape.embed_dim + 1) * t_shape.embed_dim
            t_params = t_backbone
        rows.append({"network": f"student ({objective} distillation)", "parameters": s_params,
                     "flops_per_image": 3 * s_fwd})
        rows.append({"network": "frozen teacher", "parameters": t_params, "flops_per_image": t_fwd})
    for row in rows:
        row["flops_per_step"] = row["flops_per_image"] * gb
    return rows


# Dense peak FLOP/s per device for the training dtype (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    ("H100", "bf16"): 989e12,
    ("H100", "fp16"): 989e12,
    ("H200", "bf16"): 989e12,
    ("H200", "fp16"): 989e12,
    ("A100", "bf16"): 312e12,
    ("A100", "fp16"): 312e12,
    ("H100", "fp32"): 67e12,
    ("A100", "fp32"): 19.5e12,
}

_measured: dict[str, float] = {}


def measure_cpu_peak_flops(precision: str, n: int = 1024, repeats: int = 3) -> float:
    """Measured GEMM FLOP/s on this CPU in the training dtype (best of ``repeats``; cached)."""
    if precision in _measured:
        return _measured[precision]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.bfloat16, "fp32": torch.float32}[precision]
    gen = torch.Generator().manual_seed(0)  # private: must not move the training RNG
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    _measured[precision] = 2 * n**3 / best
    return _measured[precision]


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one device: the table for known GPUs, a measured GEMM on CPU, 0 if unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (key, prec), value in PEAK_FLOPS.items():
            if key in name and prec == precision:
                return value
        return 0.0
    return measure_cpu_peak_flops(precision)
