"""Transformer building blocks of the DINOv2 backbone.

Follows facebookresearch/dinov2 `dinov2/layers/` (attention.py, block.py, drop_path.py,
layer_scale.py, mlp.py, patch_embed.py, swiglu_ffn.py). Parameter names are the ones of the
reference hub checkpoints (`attn.qkv`, `attn.proj`, `ls1.gamma`, `mlp.fc1`/`mlp.fc2`,
`mlp.w12`/`mlp.w3`, `patch_embed.proj`), so a hub state dict loads without renaming.

Shape legend: B batch, N tokens, D width, H heads, K head dim (D / H), F FFN hidden width,
C image channels, h/w patch-grid rows/columns.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ATTN_IMPLS = ("auto", "sdpa", "xformers", "math")
FFN_LAYERS = ("mlp", "swiglu")


# ----------------------------------------------------------------------------------------------
# Optional accelerated backends (imported lazily; absent or broken installs fall back cleanly)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def xformers_ops():
    """The `xformers.ops` module, or None when xformers is not installed or cannot be imported.

    Returns:
        The module (cached), or None. An installed but broken xformers (e.g. built for another
        CUDA/torch) is logged once and treated as absent.
    """
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        return importlib.import_module("xformers.ops")
    except Exception as exc:  # broken binary installs raise all sorts of errors
        logger.warning("xformers is installed but cannot be imported (%s); using SDPA", exc)
        return None


@functools.lru_cache(maxsize=None)
def fused_swiglu() -> Callable[[Tensor], Tensor] | None:
    """The fused SwiGLU activation `dvtrain.kernels.swiglu.swiglu`, or None when not available.

    Returns:
        `swiglu(x12 [..., 2F]) -> [..., F]` (silu of the first half times the second half), or None
        when the kernels package has no `swiglu` module yet. Other import errors propagate: a
        kernel that exists but fails to import is a bug, not a reason to fall back silently.
    """
    try:
        module = importlib.import_module("dvtrain.kernels.swiglu")
    except ModuleNotFoundError as exc:
        if exc.name in ("dvtrain.kernels", "dvtrain.kernels.swiglu", "triton"):
            return None
        raise
    return getattr(module, "swiglu", None)


def _has_xformers() -> bool:
    return xformers_ops() is not None


def select_attn_impl(
    requested: str, is_cuda: bool, xformers_available: bool, dtype: torch.dtype | None = None
) -> str:
    """Decide which attention kernel runs for one call.

    Args:
        requested: "auto", "sdpa", "xformers" or "math".
        is_cuda: whether q/k/v live on a CUDA device.
        xformers_available: whether `xformers.ops` imports.
        dtype: dtype of q/k/v (None = unknown, treated as fp32).

    Returns:
        "xformers" only when it is requested (or "auto") AND installed AND the tensors are on CUDA;
        "math" when requested, or for "auto" on CPU with fp16/bf16 tensors (torch's CPU flash kernel
        runs the backward of many short half-precision sequences ~8x slower than matmul-softmax-matmul;
        measured in benchmarks/results/2026-12-01-step-profile-cpu.md); otherwise "sdpa". xformers is
        never used on CPU, so an installed xformers cannot make CPU runs fail.

    Raises:
        ValueError: unknown `requested`, or "xformers" requested explicitly but not installed.
    """
    if requested not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {requested!r}")
    if requested == "math":
        return "math"
    if requested == "xformers" and not xformers_available:
        raise ValueError(
            "attn_impl='xformers' but xformers is not installed (pip install 'dvtrain[xformers]'); "
            "use attn_impl='auto' or 'sdpa'"
        )
    if requested in ("auto", "xformers") and xformers_available and is_cuda:
        return "xformers"
    if requested == "auto" and not is_cuda and dtype in (torch.float16, torch.bfloat16):
        return "math"
    return "sdpa"


SeqGroups = tuple[tuple[int, int], ...]
"""Layout of a packed token sequence: ((B_0, N_0), (B_1, N_1), ...) = B_i sequences of N_i tokens each,
stored one after the other as rows of a [sum_i B_i * N_i, D] tensor (e.g. 2B global crops, then nB
local crops). Attention never crosses a sequence (block-diagonal structure)."""


def packed_offsets(groups: SeqGroups) -> list[int]:
    """Row offsets of each group in a packed [T, D] tensor (length len(groups) + 1; last = T)."""
    offsets = [0]
    for b, n in groups:
        offsets.append(offsets[-1] + b * n)
    return offsets


@functools.lru_cache(maxsize=64)
def _xformers_block_diagonal_mask(groups: SeqGroups):
    """xformers `fmha.BlockDiagonalMask` for a packed layout (cached per layout, as the reference)."""
    fmha = importlib.import_module("xformers.ops.fmha")
    return fmha.BlockDiagonalMask.from_seqlens([n for b, n in groups for _ in range(b)])


_XFORMERS_FALLBACK_WARNED = False


def _warn_xformers_fallback(exc: Exception) -> None:
    global _XFORMERS_FALLBACK_WARNED
    if not _XFORMERS_FALLBACK_WARNED:
        _XFORMERS_FALLBACK_WARNED = True
        logger.warning("xformers memory_efficient_attention unavailable for these inputs (%s); using SDPA", exc)


def math_attention(q_BHNK: Tensor, k_BHNK: Tensor, v_BHNK: Tensor) -> Tensor:
    """Plain softmax attention softmax(q k^T / sqrt(K)) v, the definition the fast kernels must match.

    Reference: dinov2/layers/attention.py `Attention.forward`.

    Args:
        q_BHNK, k_BHNK, v_BHNK: [B, H, N, K] queries, keys, values (any float dtype).

    Returns:
        [B, H, N, K] attention output, dtype of the inputs (softmax in at least fp32).
    """
    scale = q_BHNK.shape[-1] ** -0.5
    attn_BHNN = (q_BHNK * scale) @ k_BHNK.transpose(-2, -1)
    acc_dtype = torch.promote_types(attn_BHNN.dtype, torch.float32)  # fp32 for half types, else as is
    attn_BHNN = attn_BHNN.softmax(dim=-1, dtype=acc_dtype).to(v_BHNK.dtype)
    return attn_BHNN @ v_BHNK


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Reference: dinov2/layers/attention.py (`Attention`, `MemEffAttention`). Parameters
    `qkv` [3D, D] (rows: all q, then all k, then all v; heads contiguous inside each) and `proj`.

    Args:
        dim: width D.
        num_heads: H; D must be divisible by H.
        qkv_bias, proj_bias: biases of the two projections.
        attn_impl: "auto" (xformers on CUDA when installed, else SDPA), "sdpa", "xformers", "math".

    Raises:
        ValueError: D not divisible by H, or an invalid `attn_impl` (see `select_attn_impl`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        # validate eagerly: an unknown name, or an explicit "xformers" without xformers, fails here
        select_attn_impl(attn_impl, is_cuda=False, xformers_available=attn_impl != "xformers" or _has_xformers())
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, seq_groups: SeqGroups | None = None) -> Tensor:
        """Self-attention over [B, N, D] sequences, or over a packed token sequence.

        Args:
            x: [B, N, D]; or, with `seq_groups`, packed tokens [T, D] (T = sum B_i * N_i).
            seq_groups: packed layout (see `SeqGroups`); attention stays inside each sequence
                (block-diagonal), as the reference's `MemEffAttention` with `BlockDiagonalMask`.

        Returns:
            Same shape and dtype as `x`.
        """
        if seq_groups is not None:
            return self._forward_packed(x, seq_groups)
        B, N, D = x.shape
        H = self.num_heads
        qkv_BN3HK = self.qkv(x).reshape(B, N, 3, H, D // H)
        impl = self._impl(qkv_BN3HK)
        if impl == "xformers":
            q_BNHK, k_BNHK, v_BNHK = qkv_BN3HK.unbind(2)
            try:
                return self.proj(xformers_ops().memory_efficient_attention(q_BNHK, k_BNHK, v_BNHK).reshape(B, N, D))
            except NotImplementedError as exc:  # no xformers operator for these inputs / this build
                if self.attn_impl != "auto":
                    raise
                _warn_xformers_fallback(exc)
                impl = "sdpa"
        out_BND = self._attend(qkv_BN3HK, impl)
        return self.proj(out_BND)

    def _impl(self, qkv: Tensor) -> str:
        # xformers is imported only where it could be used (CUDA, or when asked for by name)
        ops = xformers_ops() if qkv.is_cuda or self.attn_impl == "xformers" else None
        return select_attn_impl(self.attn_impl, qkv.is_cuda, ops is not None, qkv.dtype)

    @staticmethod
    def _attend(qkv_BN3HK: Tensor, impl: str) -> Tensor:
        """Attention of B equal-length sequences with SDPA or the math path; returns [B, N, H*K]."""
        B, N, _, H, K = qkv_BN3HK.shape
        q_BHNK, k_BHNK, v_BHNK = qkv_BN3HK.permute(2, 0, 3, 1, 4).unbind(0)
        if impl == "math":
            out_BHNK = math_attention(q_BHNK, k_BHNK, v_BHNK)
        else:
            out_BHNK = F.scaled_dot_product_attention(q_BHNK, k_BHNK, v_BHNK)
        return out_BHNK.transpose(1, 2).reshape(B, N, H * K)

    def _forward_packed(self, x_TD: Tensor, groups: SeqGroups) -> Tensor:
        """Packed attention: one qkv and one proj GEMM over all T tokens; the attention itself per
        group of equal-length sequences (batched SDPA / math), or one xformers call with a
        `BlockDiagonalMask` on CUDA."""
        T, D = x_TD.shape
        H = self.num_heads
        qkv_T3HK = self.qkv(x_TD).reshape(T, 3, H, D // H)
        impl = self._impl(qkv_T3HK)
        if impl == "xformers":
            q_1THK, k_1THK, v_1THK = qkv_T3HK.unsqueeze(0).unbind(2)
            try:
                out = xformers_ops().memory_efficient_attention(
                    q_1THK, k_1THK, v_1THK, attn_bias=_xformers_block_diagonal_mask(tuple(groups))
                )
                return self.proj(out.reshape(T, D))
            except NotImplementedError as exc:
                if self.attn_impl != "auto":
                    raise
                _warn_xformers_fallback(exc)
                impl = "sdpa"
        offsets = packed_offsets(groups)
        outs = [
            self._attend(qkv_T3HK[lo:hi].view(b, n, 3, H, D // H), impl).reshape(b * n, D)
            for (b, n), lo, hi in zip(groups, offsets[:-1], offsets[1:])
        ]
        out_TD = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.proj(out_TD)


class Mlp(nn.Module):
    """Two-layer GELU MLP `fc2(gelu(fc1(x)))` (reference dinov2/layers/mlp.py).

    Args:
        dim: D. hidden_dim: F. bias: biases of fc1/fc2.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x_BND: Tensor) -> Tensor:
        """Args: x_BND [..., D]. Returns: [..., D]."""
        return self.fc2(self.act(self.fc1(x_BND)))


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """SwiGLU hidden width from the MLP hidden width: `(int(F_mlp * 2 / 3) + 7) // 8 * 8`.

    Reference: dinov2/layers/swiglu_ffn.py `SwiGLUFFNFused` (S 1536->1024, B 3072->2048,
    L 4096->2736, g 6144->4096). Hugging Face `Dinov2SwiGLUFFN` uses the same rule.
    """
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN `w3(silu(x1) * x2)` with `x1, x2 = w12(x).chunk(2)`.

    Reference: dinov2/layers/swiglu_ffn.py. `w12` [2F, D] holds the gate rows first, then the up
    rows; `w3` [D, F]. On CUDA the activation runs in the fused Triton kernel
    `dvtrain.kernels.swiglu.swiglu` when that module exists; otherwise in pure torch. Parameters
    and state-dict keys are identical either way.

    Args:
        dim: D. hidden_dim: F (already the SwiGLU width, see `swiglu_hidden_dim`). bias: biases.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x_BND: Tensor) -> Tensor:
        """Args: x_BND [..., D]. Returns: [..., D]."""
        x12_BN2F = self.w12(x_BND)
        kernel = fused_swiglu() if x12_BN2F.is_cuda else None
        if kernel is not None:
            hidden_BNF = kernel(x12_BN2F)
        else:
            x1_BNF, x2_BNF = x12_BN2F.chunk(2, dim=-1)
            hidden_BNF = F.silu(x1_BNF) * x2_BNF
        return self.w3(hidden_BNF)


class LayerScale(nn.Module):
    """Per-channel residual scaling `x * gamma` (reference dinov2/layers/layer_scale.py).

    Args:
        dim: D. init_value: initial value of every entry of `gamma` [D].
    """

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        """Refill `gamma` with the init value."""
        with torch.no_grad():
            self.gamma.fill_(self.init_value)

    def forward(self, x_BND: Tensor) -> Tensor:
        """Args: x_BND [..., D]. Returns: x * gamma, [..., D]."""
        return x_BND * self.gamma


def drop_path(x_BND: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Per-sample stochastic depth: zero a residual branch for whole samples, rescale the rest.

    Reference: dinov2/layers/drop_path.py.

    Args:
        x_BND: [B, ...] residual branch output. drop_prob: probability of dropping a sample.
        training: no-op when False.

    Returns:
        [B, ...]: x * bernoulli(1 - p) / (1 - p) per sample.
    """
    if drop_prob == 0.0 or not training:
        return x_BND
    keep_prob = 1.0 - drop_prob
    shape = (x_BND.shape[0],) + (1,) * (x_BND.ndim - 1)
    keep_B11 = x_BND.new_empty(shape).bernoulli_(keep_prob)
    return x_BND * keep_B11.div_(keep_prob)


def drop_add_residual_stochastic_depth(
    x_BND: Tensor, residual_fn: Callable[[Tensor], Tensor], sample_drop_ratio: float
) -> Tensor:
    """Sample-subset stochastic depth: run the branch on a random subset of the batch only.

    Reference: dinov2/layers/block.py `drop_add_residual_stochastic_depth`. The branch runs on
    `max(int(B * (1 - ratio)), 1)` samples picked by `randperm`; their residual is added with
    weight `B / subset`, the other samples pass unchanged. Saves the branch compute for the
    dropped samples, which is why the reference uses it only above a rate of 0.1.

    Args:
        x_BND: [B, N, D] block input. residual_fn: [b, N, D] -> [b, N, D].
        sample_drop_ratio: drop rate in (0, 1).

    Returns:
        [B, N, D] x plus the scaled residual on the kept samples.
    """
    B = x_BND.shape[0]
    subset = max(int(B * (1 - sample_drop_ratio)), 1)
    keep_b = torch.randperm(B, device=x_BND.device)[:subset]
    residual_bND = residual_fn(x_BND[keep_b])
    out = torch.index_add(
        x_BND.flatten(1), 0, keep_b, residual_bND.flatten(1).to(x_BND.dtype), alpha=B / subset
    )
    return out.view_as(x_BND)


def drop_add_residual_stochastic_depth_packed(
    x_TD: Tensor,
    groups: SeqGroups,
    residual_fn: Callable[[Tensor, SeqGroups], Tensor],
    sample_drop_ratio: float,
) -> Tensor:
    """Sample-subset stochastic depth on a packed sequence, per group (crop batch).

    Reference: dinov2/layers/block.py `drop_add_residual_stochastic_depth_list` (the training path
    of `NestedTensorBlock.forward_nested` for every drop rate > 0): for each group, in order, the
    branch runs on `max(int(B_i * (1 - ratio)), 1)` sequences drawn by `randperm(B_i)`, all kept
    sequences packed into one call; each group adds its residual with weight `B_i / subset_i`.

    Args:
        x_TD: [T, D] packed block input. groups: its layout (`SeqGroups`).
        residual_fn: (packed kept tokens [T', D], their layout) -> [T', D].
        sample_drop_ratio: drop rate in (0, 1).

    Returns:
        [T, D] x plus the scaled residual on the kept sequences.
    """
    D = x_TD.shape[-1]
    offsets = packed_offsets(groups)
    x_groups, keeps, kept_groups = [], [], []
    for (b, n), lo, hi in zip(groups, offsets[:-1], offsets[1:]):
        subset = max(int(b * (1 - sample_drop_ratio)), 1)
        keeps.append(torch.randperm(b, device=x_TD.device)[:subset])
        x_groups.append(x_TD[lo:hi].reshape(b, n * D))
        kept_groups.append((subset, n))
    kept_TD = torch.cat([xg.index_select(0, k).reshape(-1, D) for xg, k in zip(x_groups, keeps)])
    kept_groups_t = tuple(kept_groups)
    residual_TD = residual_fn(kept_TD, kept_groups_t)
    kept_offsets = packed_offsets(kept_groups_t)
    out = []
    for i, (b, n) in enumerate(groups):
        subset = kept_groups[i][0]
        res = residual_TD[kept_offsets[i] : kept_offsets[i + 1]].reshape(subset, n * D).to(x_TD.dtype)
        out.append(torch.index_add(x_groups[i], 0, keeps[i], res, alpha=b / subset).reshape(b * n, D))
    return torch.cat(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    Reference: dinov2/layers/block.py `Block` and `NestedTensorBlock`. Stochastic depth on [B, N, D]
    input: none at rate 0; per-sample `drop_path` for rates in (0, 0.1]; the sample-subset variant
    above 0.1 (as the reference). On packed input: the per-group sample-subset variant at any rate.

    Args:
        dim: D. num_heads: H. mlp_ratio: FFN hidden = int(D * mlp_ratio) (SwiGLU: then
        `swiglu_hidden_dim`). ffn_layer: "mlp" or "swiglu". qkv_bias, proj_bias, ffn_bias: biases.
        drop_path: stochastic depth rate. layerscale_init: LayerScale init, None = no LayerScale.
        attn_impl: see `Attention`.

    Raises:
        ValueError: unknown ffn_layer, drop_path outside [0, 1).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        layerscale_init: float | None = 1e-5,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_impl=attn_impl)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        mlp_hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, mlp_hidden, bias=ffn_bias)
        else:
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(mlp_hidden), bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.sample_drop_ratio = float(drop_path)

    def _attn_residual(self, x: Tensor, seq_groups: SeqGroups | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), seq_groups))

    def _ffn_residual(self, x: Tensor, seq_groups: SeqGroups | None = None) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, seq_groups: SeqGroups | None = None) -> Tensor:
        """One block over [B, N, D] sequences, or over a packed token sequence.

        Args:
            x: [B, N, D]; or, with `seq_groups`, packed tokens [T, D] of several crop batches
                (reference `NestedTensorBlock.forward_nested`): norms, FFN and LayerScale run once over
                all T tokens, attention stays inside each sequence. Training with drop path > 0 then
                uses the per-group sample-subset variant for every rate, as the reference's packed
                path (`drop_add_residual_stochastic_depth_packed`).
            seq_groups: packed layout (see `SeqGroups`), or None.

        Returns:
            Same shape and dtype as `x`.
        """
        p = self.sample_drop_ratio
        if seq_groups is not None:
            if self.training and p > 0.0:
                x = drop_add_residual_stochastic_depth_packed(x, seq_groups, self._attn_residual, p)
                return drop_add_residual_stochastic_depth_packed(x, seq_groups, self._ffn_residual, p)
            x = x + self._attn_residual(x, seq_groups)
            return x + self._ffn_residual(x)
        if self.training and p > 0.1:
            x = drop_add_residual_stochastic_depth(x, self._attn_residual, p)
            x = drop_add_residual_stochastic_depth(x, self._ffn_residual, p)
        elif self.training and p > 0.0:
            x = x + drop_path(self._attn_residual(x), p, True)
            x = x + drop_path(self._ffn_residual(x), p, True)
        else:
            x = x + self._attn_residual(x)
            x = x + self._ffn_residual(x)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d(C, D, p, stride p), flattened row-major.

    Reference: dinov2/layers/patch_embed.py.

    Args:
        patch_size: p (square patches). in_chans: C. embed_dim: D.
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        """Args: x_BCHW [B, C, H, W], H and W multiples of p.

        Returns:
            [B, (H/p)*(W/p), D]; token k sits at grid row k // (W/p), column k % (W/p).

        Raises:
            ValueError: H or W not a multiple of p.
        """
        _, _, H, W = x_BCHW.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} (HxW) is not a multiple of the patch size {p}; resize or crop it")
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)
