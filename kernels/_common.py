"""Shared plumbing for the Triton kernels: one kernel body, three launchers.

Each kernel body is a plain Python function written in `triton.language`. `TritonKernel` turns it into
  - an interpreted kernel (`triton.runtime.interpreter.InterpretedFunction`) for CPU tensors, so the
    *same* body runs on a machine without a GPU, independent of whether `TRITON_INTERPRET=1` was set
    before `triton` was imported (pytest imports modules in an order we do not control);
  - a `triton.jit` kernel launched with explicit block sizes (tests, benchmarks of one config);
  - a `triton.autotune` kernel over a list of configs (the CUDA default), built lazily on first use so
    importing this module never needs a GPU driver.

Interpreter limits that shape the kernel bodies (triton 3.x):
  - no `@triton.autotune` without an active driver -> explicit block sizes on CPU;
  - the standard-library helpers (`tl.max`, `tl.sum`, `tl.sigmoid`, ...) are `@triton.jit` functions that
    only run inside the interpreter when `TRITON_INTERPRET=1` was set at import time, so kernel bodies use
    core builtins only and reduce with `tl.reduce(x, axis, MAX_COMBINE/MIN_COMBINE/SUM_COMBINE)` (which
    the interpreter maps onto numpy and the compiler lowers exactly like `tl.max`/`tl.min`/`tl.sum`);
  - no libdevice (tanh, erf) and no bf16 `tl.dot` -> sigmoid via `exp`, dot products in fp32.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

try:  # triton is a Linux-only dependency: elsewhere the references serve every device
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without triton wheels
    triton = tl = None
    HAS_TRITON = False


def make_config(kwargs: dict, **options) -> object:
    """A `triton.Config`, or None where triton is not installed."""
    return triton.Config(kwargs, **options) if HAS_TRITON else None


if HAS_TRITON:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _min_combine(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _sum_combine(a, b):
        return a + b

    # The interpreter recognises triton's own combine functions by identity and reduces with numpy; our own
    # fallbacks (used only if a future triton renames them) are correct but reduce element by element.
    MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max_combine)
    MIN_COMBINE = getattr(tl.standard, "_elementwise_min", _min_combine)
    SUM_COMBINE = getattr(tl.standard, "_sum_combine", _sum_combine)
else:  # pragma: no cover
    MAX_COMBINE = MIN_COMBINE = SUM_COMBINE = None


def is_triton_device(device: torch.device) -> bool:
    """True where compiled Triton kernels run: CUDA (incl. ROCm builds of torch) with triton installed."""
    return device.type == "cuda" and HAS_TRITON


def require_triton() -> None:
    """Raise a clear error when a Triton path is asked for explicitly but triton is not installed.

    Raises:
        RuntimeError: triton is not importable on this platform.
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "triton is not installed (it ships for Linux only); use the dispatch functions, which fall back "
            "to the pure-torch references, or install triton."
        )


class TritonKernel:
    """A Triton kernel body with an interpreted, a jitted and a lazily autotuned launcher.

    Args:
        fn: the kernel body (a plain function using `triton.language`; not decorated).
        configs: autotune configs for CUDA (`triton.Config` with the body's constexpr block sizes).
        key: argument names whose change re-triggers autotuning.
        reset_to_zero: output arguments the autotuner must zero between trials (accumulating kernels).
    """

    def __init__(
        self,
        fn: Callable,
        configs: Sequence[triton.Config],
        key: Sequence[str],
        reset_to_zero: Sequence[str] | None = None,
    ) -> None:
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.reset_to_zero = list(reset_to_zero) if reset_to_zero else None

    @functools.cached_property
    def interpreted(self):
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(self.fn)

    @functools.cached_property
    def jitted(self):
        return triton.jit(self.fn)

    @functools.cached_property
    def autotuned(self):
        return triton.autotune(configs=self.configs, key=self.key, reset_to_zero=self.reset_to_zero)(self.jitted)

    def compile_for(
        self, signature: dict[str, str], constexprs: dict, arch: int = 90, num_warps: int = 4, num_stages: int = 3
    ):
        """Compile ahead of time for an NVIDIA GPU target, without needing a GPU (triton ships ptxas).

        Lets CPU-only CI prove that the CUDA path compiles (TTIR -> PTX -> cubin) for e.g. sm_90 / sm_80.

        Args:
            signature: argument name -> triton type ("*fp32", "i32", "fp32", "constexpr", ...).
            constexprs: values of the constexpr arguments.
            arch: compute capability as an int (90 = Hopper, 80 = Ampere).
            num_warps, num_stages: launch options as in `triton.Config`.

        Returns:
            triton CompiledKernel (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared` in bytes).
        """
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        source = ASTSource(fn=self.jitted, signature=signature, constexprs=constexprs)
        options = {"num_warps": num_warps, "num_stages": num_stages}
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)

    def launcher(self, device: torch.device, explicit_config: bool):
        """The launcher for tensors on `device`: interpreter on CPU, else jit (explicit) or autotune."""
        if not is_triton_device(device):
            return self.interpreted
        return self.jitted if explicit_config else self.autotuned


def check_block(name: str, value: int, minimum: int = 16) -> int:
    """Validate a user-given block size: a power of two >= `minimum` (tl.dot and tl.arange need it).

    Raises:
        ValueError: when `value` is not such a power of two.
    """
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name}={value} is not valid: use a power of two >= {minimum} (e.g. 16, 32, 64, 128).")
    return value
