"""Fused SwiGLU kernel (kernels/swiglu.py) against its pure-torch reference.

On CPU the Triton kernel body runs in the Triton interpreter (the custom op routes CPU tensors to
`InterpretedFunction`, so this works whether or not TRITON_INTERPRET=1 was set before triton was
imported). CUDA tests are marked `gpu` and skipped with a reason on machines without one.

Tolerances (kernel vs the fp32 reference evaluated on the same, already-rounded inputs):
  fp32: rtol 1e-5, atol 1e-6 -- same fp32 math, only exp/sigmoid formulation and rounding order differ.
  fp16: rtol 1e-3, atol 1e-5 -- the kernel rounds its fp32 result once to fp16 (half-ulp = 4.9e-4 rel).
  bf16: rtol 8e-3, atol 1e-5 -- likewise for bf16 (half-ulp = 3.9e-3 rel).
"""

from __future__ import annotations

import os
import pytest
import torch

from dvtrain.kernels import swiglu as swiglu_mod
from dvtrain.kernels.swiglu import swiglu, swiglu_reference, swiglu_triton

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}
DTYPES = list(TOL)
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the compiled Triton path needs a GPU"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _fp32_reference(x12: torch.Tensor, grad_out: torch.Tensor):
    x = x12.detach().float().requires_grad_(True)
    y = swiglu_reference(x)
    y.backward(grad_out.float())
    return y.detach(), x.grad


def _check_against_reference(x12: torch.Tensor, block_h: int | None) -> None:
    x12 = x12.detach().requires_grad_(True)
    y = swiglu_triton(x12, block_h=block_h)
    assert y.dtype == x12.dtype and y.shape == (*x12.shape[:-1], x12.shape[-1] // 2)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref, dx_ref = _fp32_reference(x12, grad_out)
    torch.testing.assert_close(y.float(), y_ref, **TOL[x12.dtype])
    assert x12.grad.dtype == x12.dtype and x12.grad.shape == x12.shape
    torch.testing.assert_close(x12.grad.float(), dx_ref, **TOL[x12.dtype])


# (leading shape, H, block_h): odd widths, one row, 3-D input, several block sizes; few big ones (interpreter).
CASES = [
    ((1,), 7, 16),
    ((37,), 129, 16),
    ((37,), 129, 64),
    ((513,), 384, 512),
    ((2, 3), 40, None),
]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,H,block_h", CASES, ids=[f"{c[0]}x{c[1]}-b{c[2]}" for c in CASES])
def test_interpret_matches_reference(lead, H, block_h, dtype):
    x12 = (torch.randn(*lead, 2 * H) * 3).to(dtype)
    _check_against_reference(x12, block_h)


@pytest.mark.interpret
def test_interpret_hand_computed_values_and_grads():
    # x1 = [1, -1, 0, 3], x2 = [2, 1, 5, -0.5]; values from silu(x1) * x2 and its derivatives in fp64.
    x12 = torch.tensor([[1.0, -1.0, 0.0, 3.0, 2.0, 1.0, 5.0, -0.5]], requires_grad=True)
    y = swiglu_triton(x12, block_h=16)
    y.backward(torch.ones_like(y))
    expected_y = torch.tensor([[1.4621171572600098, -0.2689414213699951, 0.0, -1.42886119023365]])
    expected_dx1 = [1.8553410237429737, 0.07232948812851325, 2.5, -0.5440520530075846]
    expected_dx2 = [0.7310585786300049, -0.2689414213699951, 0.0, 2.8577223804673]
    torch.testing.assert_close(y, expected_y, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x12.grad, torch.tensor([expected_dx1 + expected_dx2]), rtol=1e-6, atol=1e-7)


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
def test_interpret_extreme_inputs_stay_finite():
    # exp(-x1) overflows fp32 for x1 < -88: the sigmoid must go to 0, not NaN.
    x1 = torch.tensor([-1000.0, -100.0, -30.0, 30.0, 100.0, 1000.0])
    x12 = torch.cat([x1, torch.full_like(x1, 2.0)]).unsqueeze(0).requires_grad_(True)
    y = swiglu_triton(x12, block_h=16)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x12.grad).all()
    y_ref, dx_ref = _fp32_reference(x12, torch.ones_like(y))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x12.grad, dx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.interpret
def test_interpret_non_contiguous_inputs():
    H = 24
    wide = torch.randn(5, 3 * H)
    sliced = wide[:, : 2 * H]  # row stride 3H, unit column stride: read in place
    transposed = torch.randn(2 * H, 6).t()  # column stride 6: copied once
    for x12 in (sliced, transposed):
        assert not x12.is_contiguous()
        _check_against_reference(x12, 16)
    # a non-contiguous incoming gradient
    x12 = torch.randn(4, 2 * H, requires_grad=True)
    y = swiglu_triton(x12, block_h=16)
    g = torch.randn(H, 4).t()
    y.backward(g)
    _, dx_ref = _fp32_reference(x12, g)
    torch.testing.assert_close(x12.grad, dx_ref, **TOL[torch.float32])


@pytest.mark.interpret
def test_interpret_saves_only_the_input_for_backward():
    """Eager SwiGLU saves x1, x2 and silu(x1) (x12 storage + [.., H]); ours saves x12 only."""

    def saved_bytes(fn, x):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(storages.values())

    x12 = torch.randn(8, 64, requires_grad=True)
    ours = saved_bytes(lambda x: swiglu_triton(x, block_h=32), x12)
    eager = saved_bytes(swiglu_reference, x12)
    assert ours == x12.numel() * 4
    assert eager >= ours + 8 * 32 * 4


@pytest.mark.interpret
def test_interpret_empty_input():
    x12 = torch.randn(0, 16, requires_grad=True)
    y = swiglu_triton(x12)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x12.grad.shape == (0, 16)


@pytest.mark.interpret
def test_custom_op_registrations_and_compile():
    """Fake + autograd registrations are consistent (opcheck) and torch.compile traces through the op."""
    x12 = torch.randn(3, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.dvtrain.swiglu_fwd.default, (x12, 16))
    compiled = torch.compile(lambda x: swiglu_triton(x, block_h=16), backend="aot_eager", fullgraph=True)
    y = compiled(x12)
    y.sum().backward()
    y_ref, dx_ref = _fp32_reference(x12, torch.ones_like(y))
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(x12.grad, dx_ref, **TOL[torch.float32])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(4, 7), "last dim is not even"),
        (torch.ones(4, 8, dtype=torch.int32), "supports float16"),
        (torch.tensor(1.0), "last dim is not even"),
    ],
)
def test_invalid_inputs_raise(bad, match):
    for fn in (swiglu, swiglu_reference, swiglu_triton):
        with pytest.raises(ValueError, match=match):
            fn(bad)


def test_invalid_block_size_raises():
    with pytest.raises(ValueError, match="block_h=24"):
        swiglu_triton(torch.randn(2, 8), block_h=24)


def test_dispatch_cpu_uses_reference():
    x12 = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    y = swiglu(x12)
    assert swiglu_mod.last_path == "reference"
    assert torch.equal(y, swiglu_reference(x12))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dispatch_uses_triton_and_matches_reference(dtype):
    x12 = (torch.randn(2, 257, 2 * 2736, device="cuda") * 3).to(dtype).requires_grad_(True)
    y = swiglu(x12)
    assert swiglu_mod.last_path == "triton"
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, dx_ref = _fp32_reference(x12, g)
    torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])
    torch.testing.assert_close(x12.grad.float(), dx_ref, **TOL[dtype])
    for block_h in (16, 256):  # explicit (non-autotuned) launches
        torch.testing.assert_close(swiglu_triton(x12, block_h=block_h), y)


@pytest.mark.gpu
@requires_cuda
def test_cuda_peak_memory_not_above_eager():
    x12 = torch.randn(64 * 257, 2 * 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def peak(fn):
        x12.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x12).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak(swiglu_triton) <= peak(swiglu_reference)


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_kernels_compile_ahead_of_time(arch, dtype, tmp_path, monkeypatch):
    """Without a GPU: the CUDA path compiles to a cubin (triton ships ptxas), for Hopper and Ampere."""
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend on this platform")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: triton.jit builds interpreted kernels, nothing to compile")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile, not a cache hit
    rows = {"H": "i32"}
    fwd_sig = {"x12_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **rows, "stride_x_row": "i32", "stride_out_row": "i32"}
    bwd_sig = {"grad_ptr": f"*{dtype}", "x12_ptr": f"*{dtype}", "dx12_ptr": f"*{dtype}", **rows}
    bwd_sig.update(stride_g_row="i32", stride_x_row="i32", stride_dx_row="i32")
    for kernel, sig in ((swiglu_mod._FWD, fwd_sig), (swiglu_mod._BWD, bwd_sig)):
        compiled = kernel.compile_for({**sig, "BLOCK_H": "constexpr"}, {"BLOCK_H": 1024}, arch=arch, num_warps=4)
        assert len(compiled.asm["cubin"]) > 0 and "ld.global" in compiled.asm["ptx"]
