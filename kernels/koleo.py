"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator), streamed nearest neighbours.

Follows dinov2/loss/koleo_loss.py (Sablayrolles et al. 2019, "Spreading vectors for similarity
search"; DINOv2 paper sec. 3): rows are L2-normalised (F.normalize, eps), each row's nearest neighbour
is the other row with the largest dot product, and the loss is
    -mean_i log(||x_i - x_nn(i) + 1e-8||_2 + eps)        (torch.pairwise_distance adds 1e-8 to the difference)

The reference builds the B x B dot-product matrix. The Triton kernel streams over column blocks with a
running (best dot, best index) per row, so it needs O(B * D) memory, and computes the neighbour
distance in its epilogue. Everything is fp32 whatever the input dtype (the reference gives +inf in fp16
for duplicate rows). Ties (equal dot products) resolve to the lowest column index in both paths.

Shape legend: B = rows (batch), D = feature width.

Public entry points:
  koleo_loss(x, eps)            dispatch: CUDA tensor -> Triton custom op, otherwise `koleo_loss_reference`.
  koleo_loss_triton(x, eps,...) the custom op path on any device (CPU runs the Triton interpreter).
  koleo_loss_reference(x, eps)  pure torch (B x B matrix).
  koleo_nearest_neighbors(x)    indices and distances from the kernel (no autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ._common import (
    MAX_COMBINE,
    MIN_COMBINE,
    SUM_COMBINE,
    TritonKernel,
    make_config,
    check_block,
    is_triton_device,
    require_triton,
    tl,
    triton,
)

__all__ = ["koleo_loss", "koleo_loss_triton", "koleo_loss_reference", "koleo_nearest_neighbors", "last_path"]

# torch.nn.PairwiseDistance(2, eps=1e-8) in the reference: fixed, independent of the `eps` argument.
PDIST_EPS = 1e-8

# Which implementation the last eager `koleo_loss` call used: "triton" or "reference" (tests, benchmarks).
last_path: str | None = None


def _koleo_nn_body(
    xh_ptr,
    idx_ptr,
    dist_ptr,
    B,
    D,
    stride_row,
    pdist_eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Per block of BLOCK_M rows: argmax_j!=i <xh_i, xh_j> over all columns, then ||xh_i - xh_nn + eps||."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    row_off = rows.to(tl.int64)[:, None] * stride_row
    ks = tl.arange(0, BLOCK_K)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.full((BLOCK_M,), 0, tl.int32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < B
        col_off = cols.to(tl.int64)[:, None] * stride_row
        dots = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            k_ok = k < D
            a = tl.load(xh_ptr + row_off + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(xh_ptr + col_off + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dots = tl.dot(a, tl.trans(b), dots, input_precision=DOT_PRECISION)
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])
        dots = tl.where(valid, dots, float("-inf"))
        block_best = tl.reduce(dots, 1, MAX_COMBINE)
        # lowest column index among the block's maxima; strict '>' below keeps earlier blocks on ties
        candidates = tl.where(dots == block_best[:, None], cols[None, :], 2147483647)
        block_idx = tl.reduce(candidates, 1, MIN_COMBINE)
        better = block_best > best
        best = tl.where(better, block_best, best)
        best_idx = tl.where(better, block_idx, best_idx)

    nn_off = best_idx.to(tl.int64)[:, None] * stride_row
    sq = tl.full((BLOCK_M,), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        mask = row_ok[:, None] & (k < D)[None, :]
        a = tl.load(xh_ptr + row_off + k[None, :], mask=mask, other=0.0)
        b = tl.load(xh_ptr + nn_off + k[None, :], mask=mask, other=0.0)
        diff = tl.where(mask, a - b + pdist_eps, 0.0)
        sq += tl.reduce(diff * diff, 1, SUM_COMBINE)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, tl.sqrt(sq), mask=row_ok)


_CONFIGS = [
    make_config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (64, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (128, 64, 32, 8, 3),
        (128, 128, 32, 8, 3),
        (64, 64, 64, 4, 2),
        (128, 128, 64, 8, 2),
        (32, 64, 64, 4, 3),
    )
]
_NN = TritonKernel(_koleo_nn_body, _CONFIGS, key=["B", "D"])
_DEFAULT_CPU_BLOCKS = (32, 32, 32)
# fp32 dot products on tensor cores with ~fp32 accuracy (3 TF32 passes); ignored by the interpreter.
_CUDA_DOT_PRECISION = "tf32x3"


def _validate(x: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"koleo_loss expects x [B, D] (one feature row per sample); got shape {tuple(x.shape)}.")
    if x.shape[0] < 2:
        raise ValueError(
            f"koleo_loss needs at least 2 rows to find a nearest neighbour; got B={x.shape[0]}. "
            "KoLeo is computed on the per-rank batch: use a per-GPU batch size >= 2."
        )
    if x.shape[1] < 1:
        raise ValueError(f"koleo_loss expects D >= 1 features per row; got shape {tuple(x.shape)}.")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"koleo_loss supports float16, bfloat16 and float32 inputs; got {x.dtype}.")


def _nearest_neighbors(xh_BD: torch.Tensor, blocks: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on normalised fp32 rows: returns (idx [B] int64, dist [B] fp32)."""
    B, D = xh_BD.shape
    idx_B = torch.empty(B, dtype=torch.int64, device=xh_BD.device)
    dist_B = torch.empty(B, dtype=torch.float32, device=xh_BD.device)
    on_cuda = is_triton_device(xh_BD.device)
    precision = _CUDA_DOT_PRECISION if on_cuda else "ieee"
    if blocks is None and not on_cuda:
        blocks = _DEFAULT_CPU_BLOCKS
    args = (xh_BD, idx_B, dist_B, B, D, xh_BD.stride(0), PDIST_EPS)
    if blocks is not None:
        bm, bn, bk = blocks
        grid = (triton.cdiv(B, bm),)
        _NN.launcher(xh_BD.device, explicit_config=True)[grid](
            *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=precision
        )
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),)  # noqa: E731
        _NN.launcher(xh_BD.device, explicit_config=False)[grid](*args, DOT_PRECISION=precision)
    return idx_B, dist_B


def _blocks(block_m: int | None, block_n: int | None, block_k: int | None) -> tuple[int, int, int] | None:
    given = [b is not None for b in (block_m, block_n, block_k)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("koleo block sizes: give all of block_m, block_n, block_k, or none (autotune).")
    return (check_block("block_m", block_m), check_block("block_n", block_n), check_block("block_k", block_k))


@torch.library.custom_op("dvtrain::koleo_fwd", mutates_args=())
def _koleo_fwd_op(
    x: torch.Tensor, eps: float, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xh_BD = F.normalize(x.float(), p=2.0, dim=-1, eps=eps).contiguous()
    idx_B, dist_B = _nearest_neighbors(xh_BD, _blocks(block_m, block_n, block_k))
    loss = -torch.log(dist_B + eps).mean()
    return loss, idx_B, dist_B


@_koleo_fwd_op.register_fake
def _(x, eps, block_m=None, block_n=None, block_k=None):
    B = x.shape[0]
    return (
        x.new_empty((), dtype=torch.float32),
        x.new_empty((B,), dtype=torch.int64),
        x.new_empty((B,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, eps = inputs[0], inputs[1]
    _, idx_B, dist_B = output
    ctx.save_for_backward(x, idx_B, dist_B)
    ctx.eps = eps
    ctx.mark_non_differentiable(idx_B, dist_B)


def _backward(ctx, grad_loss, _grad_idx, _grad_dist):
    """d loss / d x in O(B * D), plain torch (the B x B search has no gradient: argmax indices)."""
    x, idx_B, dist_B = ctx.saved_tensors
    eps = ctx.eps
    x32_BD = x.float()
    norm_B1 = x32_BD.norm(dim=-1, keepdim=True)
    denom_B1 = norm_B1.clamp_min(eps)
    xh_BD = x32_BD / denom_B1
    B = x.shape[0]
    diff_BD = xh_BD - xh_BD[idx_B] + PDIST_EPS
    dist_B1 = dist_B.unsqueeze(1)
    # loss = -mean log(dist + eps): d loss / d dist_i = -1 / (B (dist_i + eps)); d dist / d diff = diff / dist
    coef_B1 = -grad_loss / (B * (dist_B1 + eps))
    g_diff_BD = torch.where(dist_B1 > 0, coef_B1 * diff_BD / dist_B1.clamp_min(1e-30), 0.0)
    g_xh_BD = g_diff_BD.index_add(0, idx_B, g_diff_BD, alpha=-1.0)
    # xh = x / max(||x||, eps): project out the radial part where the norm is above eps
    radial_B1 = (xh_BD * g_xh_BD).sum(dim=-1, keepdim=True)
    g_x_BD = torch.where(norm_B1 > eps, g_xh_BD - xh_BD * radial_B1, g_xh_BD) / denom_B1
    return g_x_BD.to(x.dtype), None, None, None, None


_koleo_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def koleo_loss_reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss in plain torch with the B x B dot-product matrix (dinov2/loss/koleo_loss.py), in fp32.

    Deliberate differences from the reference: the math is fp32 whatever the input dtype (the reference
    computes in the input dtype and returns +inf in fp16 for duplicate rows), and the diagonal is
    excluded with -inf rather than -1 (with -1 a row whose only other rows are antipodal could pick
    itself). Ties resolve to the lowest index (torch.argmax).

    Args:
        x: [B, D] float16/bfloat16/float32, not necessarily normalised; B >= 2.
        eps: normalisation eps (F.normalize) and the eps inside the log.

    Returns:
        Scalar float32 loss -mean_i log(||x_i - x_nn(i) + 1e-8|| + eps) on the L2-normalised rows.

    Raises:
        ValueError: x not 2-D, B < 2, or unsupported dtype.
    """
    _validate(x)
    with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 even inside an autocast region
        xh_BD = F.normalize(x.float(), p=2.0, dim=-1, eps=eps)
        with torch.no_grad():
            dots_BB = xh_BD @ xh_BD.T
            dots_BB.fill_diagonal_(float("-inf"))
            idx_B = dots_BB.argmax(dim=1)
        dist_B = F.pairwise_distance(xh_BD, xh_BD[idx_B], p=2.0, eps=PDIST_EPS)
        return -torch.log(dist_B + eps).mean()


def koleo_loss_triton(
    x: torch.Tensor,
    eps: float = 1e-8,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """KoLeo loss through the Triton custom op `dvtrain::koleo_fwd` (streamed, no B x B buffer).

    On CUDA the kernel is compiled and autotuned (or launched with the given block sizes); on CPU the same
    kernel body runs in the Triton interpreter (slow; for tests). The gradient is computed in O(B * D)
    plain torch from the saved neighbour indices and distances.

    Args:
        x: [B, D] float16/bfloat16/float32; B >= 2.
        eps: normalisation eps and the eps inside the log.
        block_m, block_n, block_k: rows per program, columns per streamed block, features per dot step
            (powers of two >= 16), all or none; None = autotune (CUDA) / 32, 32, 32 (CPU).

    Returns:
        Scalar float32 loss, as `koleo_loss_reference`.

    Raises:
        ValueError: x not 2-D, B < 2, unsupported dtype, or invalid block sizes.
        RuntimeError: triton is not installed.
    """
    require_triton()
    _validate(x)
    _blocks(block_m, block_n, block_k)
    loss, _, _ = _koleo_fwd_op(x, eps, block_m, block_n, block_k)
    return loss


def koleo_nearest_neighbors(
    x: torch.Tensor,
    eps: float = 1e-8,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbour (by dot product of normalised rows, excluding self) and distance, from the kernel.

    Args:
        x: [B, D] float16/bfloat16/float32; B >= 2.
        eps: normalisation eps.
        block_m, block_n, block_k: as in `koleo_loss_triton`.

    Returns:
        (idx [B] int64, dist [B] float32 = ||xh_i - xh_idx_i + 1e-8||).

    Raises:
        ValueError: x not 2-D, B < 2, unsupported dtype, or invalid block sizes.
        RuntimeError: triton is not installed.
    """
    require_triton()
    _validate(x)
    _blocks(block_m, block_n, block_k)
    with torch.no_grad():
        _, idx_B, dist_B = _koleo_fwd_op(x, eps, block_m, block_n, block_k)
    return idx_B, dist_B


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss -mean_i log(||x_i - x_nn(i)|| + eps) of L2-normalised rows (dinov2/loss/koleo_loss.py).

    Dispatches on the device: CUDA -> streamed Triton kernel (`koleo_loss_triton`, O(B * D) memory);
    anything else -> `koleo_loss_reference`. Both compute in fp32 and break ties to the lowest index.

    Args:
        x: [B, D] float16/bfloat16/float32 features (e.g. student CLS tokens of one global crop), B >= 2.
        eps: normalisation eps (F.normalize) and the eps inside the log; 1e-8 as in the reference.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: x not 2-D, B < 2 (no neighbour), or unsupported dtype.
    """
    global last_path
    _validate(x)
    use_triton = is_triton_device(x.device)
    if not torch.compiler.is_compiling():
        last_path = "triton" if use_triton else "reference"
    return koleo_loss_triton(x, eps) if use_triton else koleo_loss_reference(x, eps)
