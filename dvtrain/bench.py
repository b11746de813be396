"""Microbenchmarks of the Triton kernels (SwiGLU, KoLeo) against eager torch and torch.compile.

For each kernel and shape taken from the real models, times forward, backward and full (forward +
backward) steps and measures peak memory of a full step, for:
  ours      the Triton custom op (CUDA only; on CPU it would run in the interpreter, which is meaningless),
  eager     the pure-torch reference,
  compiled  torch.compile of the reference.
Reports medians over repeats and the ratio ours/eager (< 1 = faster), plus the device, versions and git
commit. Without a GPU it says so and times the references only.

Shapes (dinov2 facts): SwiGLU hidden widths 1024/2048/2736/4096 (ViT-S/B/L/g), tokens = global-crop
images per GPU x 257 (2 global crops x per-GPU batch 64/64/32/12), bf16 as in training. KoLeo on CLS
tokens B = 64 ... 4096, D = 384 ... 1536 (and 1024, ViT-L, at B = 4096), bf16 input (both paths compute in fp32).

Shape legend: M = tokens, H = SwiGLU hidden width, B = KoLeo rows, D = feature width.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dvtrain.checkpoint.atomic import write_json_atomic
from dvtrain.kernels.koleo import koleo_loss_reference, koleo_loss_triton
from dvtrain.kernels.swiglu import swiglu_reference, swiglu_triton

TOKENS_PER_GLOBAL_CROP = 257  # 224 px / patch 14 -> 16 x 16 patches + CLS
# (arch, SwiGLU hidden width H, global-crop images per GPU = 2 x per-GPU batch)
SWIGLU_SHAPES = [("vit_small", 1024, 128), ("vit_base", 2048, 128), ("vit_large", 2736, 64), ("vit_giant2", 4096, 24)]
SWIGLU_SHAPES_QUICK = [("vit_small", 1024, 2), ("vit_giant2", 4096, 1)]
KOLEO_SHAPES = [(b, d) for b in (64, 256, 1024, 4096) for d in (384, 1536)] + [(4096, 1024)]  # + ViT-L width
KOLEO_SHAPES_QUICK = [(64, 384), (256, 768)]


@dataclass
class Measurement:
    """One (kernel, shape, implementation) row. Times in milliseconds (median), memory in MiB."""

    kernel: str
    shape: str
    dtype: str
    impl: str
    forward_ms: float | None = None
    backward_ms: float | None = None
    full_ms: float | None = None
    peak_mib: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(
    run: Callable[[object], object], device: torch.device, warmup: int, repeats: int, setup=lambda: None
) -> float:
    """Median wall time of `run(setup())` in ms; `setup` (e.g. the forward before a backward) is untimed."""
    for _ in range(warmup):
        run(setup())
    times = []
    for _ in range(repeats):
        state = setup()
        _sync(device)
        start = time.perf_counter()
        run(state)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _measure(
    row: Measurement,
    fn: Callable[[torch.Tensor], torch.Tensor],
    make_input: Callable[[], torch.Tensor],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> Measurement:
    try:
        x = make_input().requires_grad_(True)
        grad = torch.randn_like(fn(x))

        def full(_=None):
            x.grad = None
            fn(x).backward(grad)

        # backward alone: a fresh forward (untimed) per repeat, so compiled graphs need no retain_graph
        row.forward_ms = _median_ms(lambda _: fn(x), device, warmup, repeats)
        row.backward_ms = _median_ms(lambda y: y.backward(grad), device, warmup, repeats, setup=lambda: fn(x))
        row.full_ms = _median_ms(full, device, warmup, repeats)
        row.peak_mib = _peak_mib(full, device)
    except Exception as exc:  # a failing implementation is reported, not fatal to the whole benchmark
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return row


def _environment(device: torch.device) -> dict:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), no GPU"
    return {
        "device": name,
        "gpu": device.type == "cuda",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": (commit or "unknown") + (" (dirty)" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cases(device: torch.device, quick: bool, select: list[str] | None = None):
    """Yield (kernel, shape label, dtype, make_input, {impl: fn}); with ``select``, only the shapes whose
    label contains one of its strings."""
    dtype = torch.bfloat16
    on_gpu = device.type == "cuda"
    impls_swiglu = {"eager": swiglu_reference, "compiled": torch.compile(swiglu_reference)}
    impls_koleo = {"eager": koleo_loss_reference, "compiled": torch.compile(koleo_loss_reference)}
    if on_gpu:
        impls_swiglu = {"ours": swiglu_triton, **impls_swiglu}
        impls_koleo = {"ours": koleo_loss_triton, **impls_koleo}
    def chosen(label: str) -> bool:
        return not select or any(part in label for part in select)

    for arch, H, images in SWIGLU_SHAPES_QUICK if quick else SWIGLU_SHAPES:
        M = images * TOKENS_PER_GLOBAL_CROP
        if not chosen(f"{arch} M={M} H={H}"):
            continue
        yield (
            "swiglu",
            f"{arch} M={M} H={H}",
            dtype,
            lambda M=M, H=H: torch.randn(M, 2 * H, device=device, dtype=dtype),
            impls_swiglu,
        )
    for B, D in KOLEO_SHAPES_QUICK if quick else KOLEO_SHAPES:
        if not chosen(f"B={B} D={D}"):
            continue
        yield "koleo", f"B={B} D={D}", dtype, lambda B=B, D=D: torch.randn(B, D, device=device, dtype=dtype), impls_koleo


def _format(results: list[Measurement]) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "| kernel | shape | impl | forward ms | backward ms | full ms | peak MiB | full / eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    eager_full = {(r.kernel, r.shape): r.full_ms for r in results if r.impl == "eager"}
    for r in results:
        base = eager_full.get((r.kernel, r.shape))
        ratio = f"{r.full_ms / base:.2f}" if r.full_ms and base else "-"
        if r.error:
            lines.append(f"| {r.kernel} | {r.shape} | {r.impl} | error: {r.error} | | | | |")
            continue
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.1f}"
        lines.append(
            f"| {r.kernel} | {r.shape} | {r.impl} | {ms(r.forward_ms)} | {ms(r.backward_ms)} | {ms(r.full_ms)} "
            f"| {peak} | {ratio} |"
        )
    return "\n".join(lines)


def run_kernel_bench(json_path: str | None = None, quick: bool = False, select: list[str] | None = None) -> dict:
    """Benchmark the SwiGLU and KoLeo kernels; print a table, optionally write JSON.

    Args:
        json_path: where to write the results as JSON (None = don't write).
        quick: few small shapes and repeats (finishes in about a minute on a 2-core CPU).
        select: only the shapes whose label contains one of these strings (``"vit_large"``, ``"B=4096"``);
            None = all.

    Returns:
        {"environment": {...device, versions, git commit...}, "results": [Measurement as dict, ...],
         "ratios": {"<kernel> <shape>": {"forward"|"backward"|"full": ours_ms / eager_ms}}}; times are
        medians in milliseconds, peak memory of one full step in MiB (CUDA only).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    warmup, repeats = (3, 7) if quick else ((5, 20) if on_gpu else (2, 5))
    env = _environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['git_commit']}")
    if not on_gpu:
        print("No GPU: the Triton kernels are not timed; timing the eager and torch.compile references only.")
    torch.manual_seed(0)
    results: list[Measurement] = []
    for kernel, shape, dtype, make_input, impls in _cases(device, quick, select):
        for impl, fn in impls.items():
            row = Measurement(kernel=kernel, shape=shape, dtype=str(dtype).removeprefix("torch."), impl=impl)
            results.append(_measure(row, fn, make_input, device, warmup, repeats))
            print(f"  {kernel:6s} {shape:28s} {impl:8s} full {results[-1].full_ms or float('nan'):9.3f} ms", flush=True)

    ratios: dict[str, dict[str, float]] = {}
    by_key = {(r.kernel, r.shape, r.impl): r for r in results}
    for (kernel, shape, impl), r in by_key.items():
        eager = by_key.get((kernel, shape, "eager"))
        if impl != "ours" or eager is None or r.error or eager.error:
            continue
        ratios[f"{kernel} {shape}"] = {
            mode: getattr(r, f"{mode}_ms") / getattr(eager, f"{mode}_ms") for mode in ("forward", "backward", "full")
        }
    table = _format(results)
    print(table)
    report = {"environment": env, "quick": quick, "select": select, "repeats": repeats,
              "results": [asdict(r) for r in results]}
    report["ratios"] = ratios
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, report)
    return report
