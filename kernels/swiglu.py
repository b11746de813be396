"""Fused SwiGLU activation over the packed `w12` output of a SwiGLU FFN: out = silu(x1) * x2.

Follows dinov2/layers/swiglu_ffn.py (`x1, x2 = self.w12(x).chunk(2, dim=-1); hidden = F.silu(x1) * x2`).
The kernel reads the packed [gate | up] tensor once, computes in fp32 and writes the [.., H] product;
the backward recomputes the sigmoid from the saved input, so the only activation kept for backward is
x12 itself (eager autograd keeps x12 *and* silu(x1)).

Shape legend: M = rows (all leading dims flattened), H = hidden width, 2H = packed width.

Public entry points:
  swiglu(x12)              dispatch: CUDA tensor -> Triton custom op, otherwise `swiglu_reference`.
  swiglu_triton(x12, ...)  the custom op path on any device (CPU runs the Triton interpreter).
  swiglu_reference(x12)    pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ._common import TritonKernel, make_config, check_block, is_triton_device, require_triton, tl, triton

__all__ = ["swiglu", "swiglu_triton", "swiglu_reference", "last_path"]

# Which implementation the last eager `swiglu` call used: "triton" or "reference" (tests, benchmarks).
last_path: str | None = None


def _swiglu_fwd_body(x12_ptr, out_ptr, H, stride_x_row, stride_out_row, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    x_row = x12_ptr + row * stride_x_row
    x1 = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + H + cols, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-x1))
    out = x1 * sig * x2
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def _swiglu_bwd_body(
    grad_ptr, x12_ptr, dx12_ptr, H, stride_g_row, stride_x_row, stride_dx_row, BLOCK_H: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    x_row = x12_ptr + row * stride_x_row
    g = tl.load(grad_ptr + row * stride_g_row + cols, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + H + cols, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-x1))
    silu = x1 * sig
    # d silu(x)/dx = sig * (1 + x * (1 - sig))
    dx1 = g * x2 * sig * (1.0 + x1 * (1.0 - sig))
    dx2 = g * silu
    dx_row = dx12_ptr + row * stride_dx_row
    tl.store(dx_row + cols, dx1.to(dx12_ptr.dtype.element_ty), mask=ok)
    tl.store(dx_row + H + cols, dx2.to(dx12_ptr.dtype.element_ty), mask=ok)


_CONFIGS = [
    make_config({"BLOCK_H": block}, num_warps=warps)
    for block in (256, 512, 1024, 2048)
    for warps in (2, 4, 8)
    if block // (32 * warps) >= 1
]
_FWD = TritonKernel(_swiglu_fwd_body, _CONFIGS, key=["H"])
_BWD = TritonKernel(_swiglu_bwd_body, _CONFIGS, key=["H"])
_DEFAULT_CPU_BLOCK = 1024


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View `t` as [M, W] with unit stride along W, copying only when no such view exists."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def _launch(kernel: TritonKernel, tensors: list[torch.Tensor], H: int, strides: list[int], M: int, block_h):
    device = tensors[0].device
    if M == 0 or H == 0:
        return
    if block_h is None and not is_triton_device(device):
        block_h = min(_DEFAULT_CPU_BLOCK, max(16, triton.next_power_of_2(H)))
    if block_h is not None:
        check_block("block_h", block_h)
        grid = (M, triton.cdiv(H, block_h))
        kernel.launcher(device, explicit_config=True)[grid](*tensors, H, *strides, BLOCK_H=block_h)
    else:
        grid = lambda meta: (M, triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
        kernel.launcher(device, explicit_config=False)[grid](*tensors, H, *strides)


@torch.library.custom_op("dvtrain::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(x12: torch.Tensor, block_h: int | None = None) -> torch.Tensor:
    H = x12.shape[-1] // 2
    if x12.numel() == 0:
        return x12.new_empty((*x12.shape[:-1], H))
    x_MW = _as_rows(x12)
    out_MH = torch.empty((x_MW.shape[0], H), dtype=x12.dtype, device=x12.device)
    _launch(_FWD, [x_MW, out_MH], H, [x_MW.stride(0), out_MH.stride(0)], x_MW.shape[0], block_h)
    return out_MH.view(*x12.shape[:-1], H)


@_swiglu_fwd_op.register_fake
def _(x12: torch.Tensor, block_h: int | None = None) -> torch.Tensor:
    return x12.new_empty((*x12.shape[:-1], x12.shape[-1] // 2))


@torch.library.custom_op("dvtrain::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(grad_out: torch.Tensor, x12: torch.Tensor, block_h: int | None = None) -> torch.Tensor:
    H = x12.shape[-1] // 2
    if x12.numel() == 0:
        return torch.empty_like(x12, memory_format=torch.contiguous_format)
    x_MW = _as_rows(x12)
    g_MH = _as_rows(grad_out)
    dx_MW = torch.empty((x_MW.shape[0], 2 * H), dtype=x12.dtype, device=x12.device)
    _launch(
        _BWD, [g_MH, x_MW, dx_MW], H, [g_MH.stride(0), x_MW.stride(0), dx_MW.stride(0)], x_MW.shape[0], block_h
    )
    return dx_MW.view(x12.shape)


@_swiglu_bwd_op.register_fake
def _(grad_out: torch.Tensor, x12: torch.Tensor, block_h: int | None = None) -> torch.Tensor:
    return torch.empty_like(x12, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    x12, block_h = inputs
    ctx.save_for_backward(x12)
    ctx.block_h = block_h


def _backward(ctx, grad_out):
    (x12,) = ctx.saved_tensors
    return _swiglu_bwd_op(grad_out, x12, ctx.block_h), None


_swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x12: torch.Tensor) -> None:
    if x12.ndim == 0 or x12.shape[-1] % 2:
        raise ValueError(
            f"swiglu expects x12 [..., 2H] packed as [gate | up]; got shape {tuple(x12.shape)} "
            "whose last dim is not even. Pass the output of the FFN's w12 projection (2 x hidden features)."
        )
    if not x12.is_floating_point() or x12.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"swiglu supports float16, bfloat16 and float32 inputs; got {x12.dtype}.")


def swiglu_reference(x12: torch.Tensor) -> torch.Tensor:
    """SwiGLU in plain torch, exactly as dinov2/layers/swiglu_ffn.py computes it (in the input dtype).

    Args:
        x12: [..., 2H] float16/bfloat16/float32, packed [gate | up] (x1, x2 = x12.chunk(2, -1)).

    Returns:
        [..., H], same dtype as x12: silu(x1) * x2.

    Raises:
        ValueError: odd last dim or unsupported dtype.
    """
    _validate(x12)
    x1, x2 = x12.chunk(2, dim=-1)
    return F.silu(x1) * x2


def swiglu_triton(x12: torch.Tensor, block_h: int | None = None) -> torch.Tensor:
    """SwiGLU through the Triton custom op `dvtrain::swiglu_fwd` (autograd via `dvtrain::swiglu_bwd`).

    On CUDA the kernel is compiled and autotuned (or launched with `block_h` when given); on CPU the same
    kernel body runs in the Triton interpreter (slow; for tests). Math is fp32 inside; the result is
    rounded once to the input dtype. Non-contiguous inputs are read in place when their rows have unit
    stride along the last dim (e.g. a slice of a wider tensor), otherwise copied once.

    Args:
        x12: [..., 2H] float16/bfloat16/float32, packed [gate | up].
        block_h: columns per program (power of two >= 16); None = autotune (CUDA) / min(1024, 2^ceil(log2 H)).

    Returns:
        [..., H], same dtype and device as x12 (contiguous).

    Raises:
        ValueError: odd last dim, unsupported dtype, or invalid block_h.
        RuntimeError: triton is not installed.
    """
    require_triton()
    _validate(x12)
    if block_h is not None:
        check_block("block_h", block_h)
    return _swiglu_fwd_op(x12, block_h)


def swiglu(x12: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a SwiGLU FFN: silu(x1) * x2 for x12 = [x1 | x2] (dinov2/layers/swiglu_ffn.py).

    Dispatches on the device: CUDA -> fused Triton kernel (`swiglu_triton`, fp32 math, saves only x12 for
    backward); anything else -> `swiglu_reference` (eager torch in the input dtype).

    Args:
        x12: [..., 2H] float16/bfloat16/float32, the packed output of the `w12` projection.

    Returns:
        [..., H], same dtype as x12.

    Raises:
        ValueError: odd last dim or unsupported dtype.
    """
    global last_path
    use_triton = is_triton_device(x12.device)
    if not torch.compiler.is_compiling():
        last_path = "triton" if use_triton else "reference"
    return swiglu_triton(x12) if use_triton else swiglu_reference(x12)
