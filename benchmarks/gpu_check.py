"""GPU acceptance check: one command that proves dvtrain's CUDA paths on one GPU in under 9 minutes.

Run it through ``benchmarks/gpu_check.sh OUTDIR [--dry-run] [--wheels DIR]`` (docs/gpu.md). Steps, each
with its own time budget (seconds on one H200; the budgets add up to 530 s, under the 9-minute target),
each run as subprocesses that are killed and reported as ``timed_out`` when the budget runs out:

  install      40  (with --wheels DIR) offline ``pip install --no-index --no-deps`` of the wheels the
                   machine lacks (benchmarks/gpu_wheels.sh), dvtrain editable; imports checked
  environment  15  GPU, driver, CUDA, cuDNN, NCCL, torch, triton, deepspeed, xformers versions
  pytest_gpu   65  ``pytest -m gpu`` over the test files that hold GPU tests, TRITON_INTERPRET unset: every
                   GPU-only test, the kernel tests in compiled mode among them (reported apart)
  bench_kernels 85 ``dvtrain bench kernels`` on CUDA: fused SwiGLU vs eager / torch.compile at ViT-L/g
                   shapes, KoLeo at B=4096, D=384/1024/1536 (time, peak memory, no B x B buffer)
  train_step  160  recipes/vitl14.yaml on one GPU, real crops (2 x 224 + 8 x 98), batch 32, through
                   benchmarks/train_step.py: ZeRO-3 vs plain torch in bf16 and fp16 (loss scaling);
                   ZeRO-3 with and without activation checkpointing: images/s, MFU, peak memory
  smoke_run    90  the bundled Fashion-MNIST as MDS shards (converted in the background from the start),
                   ``dvtrain launch recipes/smoke_cpu.yaml`` for 200 iterations, ``dvtrain eval knn``
  resume       75  the same run interrupted by SIGTERM after its first checkpoint and resumed with
                   ``--resume``; its per-iteration losses (metrics.jsonl) against the uninterrupted run's

``--dry-run`` runs the same script on a CPU with tiny shapes (a few-block ViT, 28 px crops, a few dozen
iterations): the CUDA-only steps (pytest_gpu, bench_kernels, fp16 loss scaling) are reported as skipped
with the reason, the rest really runs. Results: OUTDIR/gpu_check.json (machine-readable; ``ok`` and
``failed`` say which checks failed), OUTDIR/gpu_check.md (the same as tables), OUTDIR/gpu_check.log
(every command's output). Exit status 0 when every step that ran passed, 1 otherwise.

dvtrain is called through its CLI (``python -m dvtrain ...``) and the benchmark scripts, never its
internals, so this file imports only the standard library (it runs before anything is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FMNIST = REPO / "data" / "fashion_mnist"
TOTAL_BUDGET_S = 540  # the 9-minute target; the steps' budgets below add up to 530

BUDGETS_GPU = {"install": 40, "environment": 15, "pytest_gpu": 65, "bench_kernels": 85, "train_step": 160,
               "smoke_run": 90, "resume": 75}
# The dry run's budgets are generous: the 2-core CI/dev machine is often shared (they only stop a hang).
BUDGETS_DRY = {"install": 40, "environment": 60, "pytest_gpu": 75, "bench_kernels": 85, "train_step": 180,
               "smoke_run": 240, "resume": 240}

# train_step sub-runs: (name, child mode, precision, activation checkpointing, share of the step's budget)
TRAIN_RUNS = [("zero3_vs_plain_bf16", "pair", "bf16", False, 0.30), ("zero3_vs_plain_fp16", "pair", "fp16", False, 0.26),
              ("zero3_bf16_no_act_ckpt", "memory", "bf16", False, 0.22), ("zero3_bf16_act_ckpt", "memory", "bf16", True, 0.22)]

# Tiny shapes of the dry run (CPU): the shipped recipes narrowed to a 2-block, 64-wide ViT and 28 px crops.
TINY_VITL = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "crops.global_size=28", "crops.local_size=14",
             "crops.num_local_crops=2", "loss.num_prototypes=64", "loss.ibot_num_prototypes=64",
             "loss.bottleneck_dim=16", "loss.ibot_bottleneck_dim=16", "loss.head_hidden_dim=32",
             "loss.ibot_hidden_dim=32", "model.drop_path_rate=0.0"]
TINY_SMOKE = ["model.embed_dim=48", "model.depth=2", "model.num_heads=3", "loss.num_prototypes=64",
              "loss.bottleneck_dim=32", "loss.head_hidden_dim=64", "crops.num_local_crops=2",
              "batch.micro_batch_per_device=8", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.2",
              "teacher.temp_warmup_epochs=0.5", "data.num_workers=0", "precision=bf16"]
DRY_ITERATIONS, DRY_CKPT_EVERY = 6, 2


class StepTimeout(Exception):
    """A step's subprocess outlived what was left of the step's budget."""


class StepSkipped(Exception):
    """A step that cannot run here (the reason is the message)."""


class StepFailed(Exception):
    """A check inside a step did not hold (the message says which)."""


# --------------------------------------------------------------------------------------------------
# Running commands with a deadline
# --------------------------------------------------------------------------------------------------


class Runner:
    """Runs subprocesses for one step against its deadline; appends their output to the log file."""

    def __init__(self, log, env: dict[str, str]):
        self.log = log
        self.env = env
        self.deadline = math.inf

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _header(self, cmd: list[str]) -> None:
        self.log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        self.log.flush()

    def popen(self, cmd: list[str], cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own process group, its output into a temporary file (no pipe to fill up)."""
        self._header(cmd)
        out = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or self.env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        proc.out_file, proc.started = out, time.monotonic()
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float | None = None) -> str:
        """Wait for ``proc`` (killing its whole process group when the deadline passes); its output."""
        timeout = self.left() if timeout is None else min(timeout, self.left())
        try:
            proc.wait(timeout=max(timeout, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc)
            timed_out = True
        proc.out_file.seek(0)
        out = proc.out_file.read()
        proc.out_file.close()
        self.log.write(f"\n[gpu_check] output of `{' '.join(map(str, proc.args[:6]))} ...`:\n{out}")
        elapsed = time.monotonic() - proc.started
        if timed_out:
            self.log.write(f"\n[gpu_check] killed after the step's budget ran out ({elapsed:.1f} s)\n")
            self.log.flush()
            raise StepTimeout(f"`{' '.join(map(str, proc.args[:6]))} ...` still running when the budget ran out "
                              f"({elapsed:.0f} s)")
        self.log.write(f"[gpu_check] exit status {proc.returncode} after {elapsed:.1f} s\n")
        self.log.flush()
        return out

    def run(self, cmd: list[str], check: bool = True, timeout: float | None = None, env: dict | None = None
            ) -> tuple[int, str]:
        proc = self.popen(cmd, env=env)
        out = self.wait(proc, timeout)
        if check and proc.returncode != 0:
            raise StepFailed(f"`{' '.join(map(str, cmd[:6]))} ...` exited with {proc.returncode}: {tail(out)}")
        return proc.returncode, out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it 5 s later if still there."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, n: int = 600) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-6:])[-n:]


def py_json(runner: Runner, code: str, timeout: float | None = None) -> dict:
    """Run ``code`` in the check's Python; it prints one JSON object as its last line."""
    _, out = runner.run([sys.executable, "-c", code], timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def dvtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvtrain", *args]


# --------------------------------------------------------------------------------------------------
# Steps. Each takes the check and returns a details dict; raises StepSkipped/StepFailed/StepTimeout.
# --------------------------------------------------------------------------------------------------


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    """(Requirement, Version) from packaging, or pip's vendored copy on a machine without it."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def plan_install(wheels: list[Path], installed: dict[str, str], root_requirements: list[str]) -> tuple[dict, dict]:
    """Which carried wheels to install: every package the machine lacks, and a newer wheel of one it has only
    where the machine's version fails a requirement of dvtrain or of a wheel being installed (the machine's
    own packages win otherwise; nothing is downgraded).

    Args:
        wheels: the carried ``.whl`` files.
        installed: {canonical name: version} of the machine's Python.
        root_requirements: dvtrain's own requirement strings (pyproject.toml).

    Returns:
        ({canonical name: wheel path to install}, {canonical name: {"machine": v, "wheel": v, "because": req}}).
    """
    import zipfile

    Requirement, Version = _packaging()
    meta: dict[str, tuple[str, Path, list[str]]] = {}
    for w in wheels:
        name, version = w.name.split("-")[:2]
        with zipfile.ZipFile(w) as z:
            text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        reqs = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
        meta[_canon(name)] = (version, w, reqs)
    take = {n: m[1] for n, m in meta.items() if n not in installed}
    replaced: dict[str, dict] = {}
    pool = list(root_requirements) + [r for n in take for r in meta[n][2]]
    while pool:
        req = Requirement(pool.pop())
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        n = _canon(req.name)
        if n in take or n not in installed or n not in meta or not req.specifier:
            continue
        have, wheel_version = installed[n], meta[n][0]
        if (not req.specifier.contains(have, prereleases=True) and req.specifier.contains(wheel_version, prereleases=True)
                and Version(wheel_version) > Version(have)):
            take[n] = meta[n][1]
            replaced[n] = {"machine": have, "wheel": wheel_version, "because": str(req)}
            pool += meta[n][2]
    return take, replaced


def _dvtrain_requirements() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def step_install(c: "Check") -> dict:
    if c.wheels is None:
        raise StepSkipped("no --wheels DIR given: uses the packages already installed in this Python "
                          f"({sys.executable})")
    wheels = sorted(c.wheels.glob("*.whl"))
    if not wheels:
        raise StepFailed(f"--wheels {c.wheels}: no .whl files; prepare them with benchmarks/gpu_wheels.sh")
    import importlib.metadata as md

    installed = {_canon(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
    take, replaced = plan_install(wheels, installed, _dvtrain_requirements())
    t0 = time.monotonic()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check"]
    if take:
        c.run.run(pip + ["--no-compile"] + [str(w) for w in sorted(take.values())])
    c.run.run(pip + ["--no-build-isolation", "-e", str(REPO)])
    install_s = time.monotonic() - t0
    check = py_json(c.run, _IMPORT_CHECK)
    details = {"installed": sorted(w.name for w in take.values()), "replaced_machine_version": replaced,
               "kept_machine_version": sorted(_canon(w.name.split("-")[0]) for w in wheels if w not in take.values()),
               "install_s": round(install_s, 1), **check}
    if check["import_errors"] or check["unsatisfied"]:
        raise StepFailed(f"after install: import errors {check['import_errors']}, unsatisfied requirements "
                         f"{check['unsatisfied']}", details)
    return details


_IMPORT_CHECK = r"""
import importlib, importlib.metadata as md, json
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
errors, unsatisfied = {}, []
for mod in ("dvtrain.cli", "dvtrain.kernels", "deepspeed", "streaming", "wandb", "pydantic", "typer", "triton"):
    try:
        importlib.import_module(mod)
    except Exception as exc:
        errors[mod] = f"{type(exc).__name__}: {exc}"[:300]
for spec in md.requires("dvtrain") or []:
    req = Requirement(spec)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        unsatisfied.append(f"{req} (not installed)"); continue
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        unsatisfied.append(f"{req} (installed {have})")
print(json.dumps({"import_errors": errors, "unsatisfied": unsatisfied}))
"""

_ENV_PROBE = r"""
import importlib.metadata as md, json, os, platform, subprocess
import torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
out = {"python": platform.python_version(), "executable": os.sys.executable, "torch": torch.__version__,
       "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "triton": v("triton"),
       "deepspeed": v("deepspeed"), "xformers": v("xformers"), "transformers": v("transformers"),
       "mosaicml_streaming": v("mosaicml-streaming"), "wandb": v("wandb"), "pydantic": v("pydantic"),
       "numpy": v("numpy"), "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
               gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
               cudnn=torch.backends.cudnn.version(), nccl=str(torch.cuda.nccl.version()),
               bf16_supported=torch.cuda.is_bf16_supported())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
        out["nvidia_smi"] = smi.splitlines()[0] if smi else None
        out["driver"] = smi.split(",")[1].strip() if smi else None
    except (OSError, subprocess.SubprocessError) as exc:
        out["nvidia_smi"] = f"unavailable: {exc}"
import deepspeed
from deepspeed.accelerator import get_accelerator
out["deepspeed_accelerator"] = get_accelerator().device_name()
print(json.dumps(out))
"""


def step_environment(c: "Check") -> dict:
    env = py_json(c.run, _ENV_PROBE)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        env["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    install = c.results.get("install", {})
    env["install_s"] = install.get("details", {}).get("install_s")
    env["install_status"] = install.get("status")
    if c.gpu and not env["cuda_available"]:
        raise StepFailed("torch.cuda.is_available() is False: no usable CUDA device (run with --dry-run on a CPU)", env)
    want = "cuda" if c.gpu else "cpu"
    if env["deepspeed_accelerator"] != want:
        raise StepFailed(f"DeepSpeed picked accelerator {env['deepspeed_accelerator']!r}, expected {want!r}", env)
    return env


def _junit(path: Path) -> dict:
    """Per-test outcomes of a pytest junit XML: {'passed': [...], 'failed': [...], 'skipped': {id: reason}}."""
    out: dict = {"passed": [], "failed": [], "skipped": {}}
    if not path.is_file():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            out["failed"].append(f"{tid}: {(node.get('message') or '')[:200]}")
        elif case.find("skipped") is not None:
            out["skipped"][tid] = (case.find("skipped").get("message") or "")[:200]
        else:
            out["passed"].append(tid)
    return out


def step_pytest_gpu(c: "Check") -> dict:
    if not c.gpu:
        raise StepSkipped("CUDA only: `pytest -m gpu` skips every test without a GPU, and the kernel tests "
                          "cannot run compiled (Triton needs a GPU; on CPU they run in the interpreter)")
    xml = c.work / "pytest_gpu.xml"
    env = dict(c.run.env)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    # only the files that hold GPU tests: less to import, and a CPU-only test file cannot break collection
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    if not files:
        raise StepFailed("no test file under tests/ has a test marked gpu")
    rc, out = c.run.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                         f"--junitxml={xml}", *files], check=False, env=env)
    res = _junit(xml)
    kernels = {k: [t for t in v if "test_kernels_" in t] if isinstance(v, list)
               else {t: r for t, r in v.items() if "test_kernels_" in t} for k, v in res.items()}
    details = {"files": files, "exit_status": rc, "passed": len(res["passed"]), "failed": res["failed"], "skipped": res["skipped"],
               "kernel_tests_compiled": {"passed": kernels["passed"], "failed": kernels["failed"],
                                         "skipped": kernels["skipped"]}}
    if rc != 0 or res["failed"]:
        raise StepFailed(f"pytest exit status {rc}, {len(res['failed'])} failed: {res['failed'][:3]}", details)
    if not kernels["passed"]:
        raise StepFailed("no compiled kernel test passed (all skipped?): " + json.dumps(kernels["skipped"])[:300],
                         details)
    return details


def step_bench_kernels(c: "Check") -> dict:
    if not c.gpu:
        raise StepSkipped("CUDA only: the Triton kernels are timed compiled on a GPU; on a CPU `dvtrain bench "
                          "kernels` times the references alone")
    path = c.work / "bench_kernels.json"
    c.run.run(dvtrain("bench", "kernels", "--json", str(path), "--shape", "vit_large", "--shape", "vit_giant2",
                      "--shape", "B=4096"))
    details = summarize_kernel_bench(json.loads(path.read_text()))
    if details["errors"]:
        raise StepFailed("; ".join(details["errors"])[:500], details)
    return details


def summarize_kernel_bench(report: dict) -> dict:
    """The acceptance view of ``dvtrain bench kernels --json``: SwiGLU at ViT-L/g shapes and KoLeo at
    B = 4096, D = 1024/1536, ours vs eager and torch.compile (full = forward + backward ms, peak MiB).

    Returns:
        {"swiglu": [...], "koleo": [...], "errors": [...], "slower_than_eager": [...], ...}; an error is a
        Triton row that failed or is missing, or a KoLeo peak at or above one fp32 B x B matrix.
    """
    rows = report["results"]

    def row(kernel: str, shape_start: str, impl: str) -> dict | None:
        return next((r for r in rows if r["kernel"] == kernel and r["shape"].startswith(shape_start)
                     and r["impl"] == impl), None)

    errors = [f"{r['kernel']} {r['shape']} {r['impl']}: {r['error']}" for r in rows if r.get("error")]
    swiglu, koleo = [], []
    for arch in ("vit_large", "vit_giant2"):
        ours, eager, comp = row("swiglu", arch, "ours"), row("swiglu", arch, "eager"), row("swiglu", arch, "compiled")
        if ours is None or ours.get("full_ms") is None:
            errors.append(f"swiglu {arch}: no measurement of the Triton kernel")
            continue
        swiglu.append({"shape": ours["shape"], "ours_full_ms": ours["full_ms"], "eager_full_ms": eager and eager["full_ms"],
                       "compiled_full_ms": comp and comp["full_ms"], "ours_peak_mib": ours["peak_mib"],
                       "eager_peak_mib": eager and eager["peak_mib"], "compiled_peak_mib": comp and comp["peak_mib"],
                       "ours_over_eager": _ratio(ours, eager), "ours_over_compiled": _ratio(ours, comp)})
    for d in (1024, 1536):
        shape = f"B=4096 D={d}"
        ours, eager, comp = row("koleo", shape, "ours"), row("koleo", shape, "eager"), row("koleo", shape, "compiled")
        if ours is None or ours.get("peak_mib") is None:
            errors.append(f"koleo {shape}: no measurement of the Triton kernel")
            continue
        bxb_mib = 4096 * 4096 * 4 / 2**20  # one fp32 B x B distance matrix
        koleo.append({"shape": shape, "ours_full_ms": ours["full_ms"], "eager_full_ms": eager and eager["full_ms"],
                      "compiled_full_ms": comp and comp["full_ms"], "ours_peak_mib": ours["peak_mib"],
                      "eager_peak_mib": eager and eager["peak_mib"], "bxb_fp32_mib": bxb_mib,
                      "no_bxb_buffer": ours["peak_mib"] < bxb_mib, "ours_over_eager": _ratio(ours, eager),
                      "ours_over_compiled": _ratio(ours, comp)})
        if not koleo[-1]["no_bxb_buffer"]:
            errors.append(f"koleo {shape}: peak {ours['peak_mib']:.1f} MiB >= one B x B fp32 buffer ({bxb_mib:.0f} MiB)")
    # speed is reported, not a failure: correctness is the tests' job, the ratios are for the table
    slower = [f"{r['shape']} ({r['ours_over_eager']:.2f}x eager)" for r in swiglu + koleo
              if r["ours_over_eager"] and r["ours_over_eager"] > 1.0]
    return {"swiglu": swiglu, "koleo": koleo, "errors": errors, "slower_than_eager": slower, "rows": len(rows),
            "environment": report.get("environment")}


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("full_ms") or not b.get("full_ms"):
        return None
    return a["full_ms"] / b["full_ms"]


def step_train_step(c: "Check") -> dict:
    """vitl14 (tiny in the dry run) training steps through benchmarks/train_step.py's children."""
    overrides = [] if c.gpu else TINY_VITL
    steps, warmup = (5, 2) if c.gpu else (3, 1)
    batch = [] if c.gpu else ["--batch", "4"]
    threads = str(max(1, (os.cpu_count() or 1)) if c.gpu else 1)
    details: dict = {"recipe": "recipes/vitl14.yaml", "overrides": overrides, "steps": steps, "warmup": warmup}
    problems, skipped = [], {}
    runs = [r for r in TRAIN_RUNS if c.gpu or r[2] != "fp16"]
    for name, *_ in TRAIN_RUNS:
        if not any(r[0] == name for r in runs):
            skipped[name] = "CUDA only: fp16 loss scaling (DeepSpeed's dynamic scaler, torch.amp.GradScaler) needs a GPU"

    def command(child: str, precision: str, act_ckpt: bool) -> list[str]:
        cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--child", child, "--recipe",
               str(REPO / "recipes" / "vitl14.yaml"), "--precision", precision, "--steps", str(steps), "--warmup",
               str(warmup), "--threads", threads, *batch] + (["--act-ckpt"] if act_ckpt else [])
        for ov in overrides:
            cmd += ["--set", ov]
        return cmd

    # On the GPU one after the other (timings); in the dry run all at once (nothing is timed for real there,
    # and the shared 2-core machine spends most of each child's time starting Python and DeepSpeed).
    started = {} if c.gpu else {r[0]: c.run.popen(command(*r[1:4])) for r in runs}
    for i, (name, child, precision, act_ckpt, share) in enumerate(runs):
        # this run's share of what is left (time a faster run did not use goes to the later ones)
        timeout = max(c.run.left() * share / sum(r[4] for r in runs[i:]), 5.0) if c.gpu else c.run.left()
        try:
            proc = started.get(name) or c.run.popen(command(child, precision, act_ckpt))
            out = c.run.wait(proc, timeout=timeout)
            if proc.returncode != 0:
                raise StepFailed(f"exit status {proc.returncode}: {tail(out)}")
        except StepTimeout as exc:
            details[name] = {"status": "timed_out", "reason": str(exc)}
            problems.append(f"{name}: timed out after {timeout:.0f} s")
            continue
        except StepFailed as exc:
            details[name] = {"status": "failed", "reason": str(exc)}
            problems.append(f"{name}: {exc}")
            continue
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            details[name] = {"status": "failed", "reason": f"no RESULT line: {tail(out)}"}
            problems.append(f"{name}: no RESULT line in its output")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        entry = {"status": "passed", "precision": precision, "act_ckpt": act_ckpt, "batch": r["batch"],
                 "device": r["device"], "peak_flops": r["peak_flops"],
                 # memory of one configuration: the ZeRO-3-only runs (a pair process holds two models)
                 "peak_memory_gib": r["peak_mem_growth_mib"] / 1024 if c.gpu and child == "memory" else None,
                 "saved_activations_mib": r["peak_mem_growth_mib"] if not c.gpu and child == "memory" else None}
        for variant in ("plain", "zero3"):
            if variant in r:
                v = r[variant]
                entry[variant] = {"images_per_s": v["images_per_s"], "mfu": v["mfu"], "step_ms": 1e3 * v["median_s"]["total"],
                                  "phases_ms": {k: 1e3 * x for k, x in v["median_s"].items()},
                                  "skipped_steps": v["skipped_steps"], "flops_per_image": v["flops_per_image"]}
                if not all(math.isfinite(x) and x > 0 for x in v["median_s"].values()):
                    problems.append(f"{name} {variant}: non-finite or zero phase times")
        if "plain" in r and "zero3" in r:
            entry["zero3_over_plain_step_time"] = r["zero3"]["median_s"]["total"] / r["plain"]["median_s"]["total"]
        if precision == "bf16" and r["zero3"]["skipped_steps"]:
            problems.append(f"{name}: {r['zero3']['skipped_steps']} skipped ZeRO-3 steps in bf16 (no loss scaling there)")
        details[name] = entry
    details["skipped"] = skipped
    off, on = details.get("zero3_bf16_no_act_ckpt", {}), details.get("zero3_bf16_act_ckpt", {})
    key = "peak_memory_gib" if c.gpu else "saved_activations_mib"
    if off.get(key) is not None and on.get(key) is not None:
        details["act_ckpt_memory_ratio"] = on[key] / off[key]
        if on[key] >= off[key]:
            problems.append(f"activation checkpointing did not lower memory ({on[key]:.3g} vs {off[key]:.3g} {key})")
    if problems:
        raise StepFailed("; ".join(problems)[:600], details)
    return details


def start_conversion(c: "Check") -> None:
    """Convert the bundled Fashion-MNIST to MDS shards in the background (CPU work beside the GPU steps)."""
    names = FMNIST / "classes.txt"
    c.data = {"train": c.work / "mds" / "fmnist_train", "test": c.work / "mds" / "fmnist_test"}
    c.convert_log = (c.work / "convert.log").open("w")
    c.convert_procs = []
    for src, key, n in (("train-images-idx3-ubyte.gz", "train", "384"), ("t10k-images-idx3-ubyte.gz", "test", "192")):
        cmd = dvtrain("data", "convert", str(FMNIST / src), str(c.data[key]), "--label-names", str(names),
                      "--workers", "4" if c.gpu else "1", "--no-progress", *([] if c.gpu else ["--limit", n]))
        c.convert_log.write(f"$ {' '.join(cmd)}\n")
        c.convert_log.flush()
        c.convert_procs.append(subprocess.Popen(cmd, cwd=REPO, env=c.run.env, stdout=c.convert_log,
                                                stderr=subprocess.STDOUT, start_new_session=True))


def _wait_conversion(c: "Check") -> dict:
    t0 = time.monotonic()
    for proc in c.convert_procs:
        try:
            proc.wait(timeout=max(c.run.left(), 0.1))
        except subprocess.TimeoutExpired:
            for p in c.convert_procs:
                kill_group(p)
            raise StepTimeout("the Fashion-MNIST conversion was still running when the budget ran out")
    c.convert_log.close()
    log = (c.work / "convert.log").read_text()
    c.run.log.write("\n[gpu_check] background conversion:\n" + log)
    if any(p.returncode != 0 for p in c.convert_procs):
        raise StepFailed(f"dvtrain data convert failed: {tail(log)}")
    counts = {k: json.loads((v / "index.json").read_text()) for k, v in c.data.items()}
    return {"waited_s": round(time.monotonic() - t0, 1),
            "samples": {k: sum(s["samples"] for s in idx["shards"]) for k, idx in counts.items()}}


def _smoke_overrides(c: "Check") -> list[str]:
    base = [f"data.path={c.data['train']}", "eval.train_path=null", "eval.val_path=null", "wandb.mode=offline",
            "wandb.log_every=1"]
    if c.gpu:  # 4 epochs x 50 = 200 iterations of 64 images
        return base + ["schedule.epochs=4", "checkpoint.every=50", "data.num_workers=4"]
    return base + TINY_SMOKE + ["schedule.epochs=1", f"schedule.iterations_per_epoch={DRY_ITERATIONS}",
                                f"checkpoint.every={DRY_CKPT_EVERY}"]


def _launch_cmd(run_dir: Path, overrides: list[str], *extra: str) -> list[str]:
    cmd = dvtrain("launch", str(REPO / "recipes" / "smoke_cpu.yaml"), "-o", str(run_dir), *extra)
    for ov in overrides:
        cmd += ["--set", ov]
    return cmd


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    out: dict[int, float] = {}
    for r in rows:
        if "total" in r and "iteration" in r:
            if r["iteration"] in out:
                raise StepFailed(f"{run_dir / 'metrics.jsonl'}: iteration {r['iteration']} logged twice")
            out[r["iteration"]] = r["total"]
    return out


def step_smoke_run(c: "Check") -> dict:
    details = {"data": _wait_conversion(c)}
    run_dir = c.work / "smoke"
    c.smoke_overrides = _smoke_overrides(c)
    t0 = time.monotonic()
    c.run.run(_launch_cmd(run_dir, c.smoke_overrides))
    details["launch_s"] = round(time.monotonic() - t0, 1)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train_rows = [r for r in rows if "total" in r]
    losses = _losses(run_dir)
    expected = 200 if c.gpu else DRY_ITERATIONS
    details.update({
        "overrides": c.smoke_overrides, "status": summary.get("status"), "iterations": summary.get("iterations"),
        "images_per_s": summary.get("images_per_s"), "wall_time_s": summary.get("wall_time_s"),
        "skipped_steps": summary.get("skipped_steps"), "first_loss": losses.get(1), "last_loss": losses.get(expected),
        "mfu_last": train_rows[-1].get("mfu") if train_rows else None,
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0) for r in train_rows) if train_rows else None,
        "data_wait_fraction_last": train_rows[-1].get("data_wait_fraction") if train_rows else None})
    problems = []
    if summary.get("status") != "done" or summary.get("iterations") != expected:
        problems.append(f"summary: status {summary.get('status')!r}, {summary.get('iterations')} iterations "
                        f"(expected 'done', {expected})")
    if sorted(losses) != list(range(1, expected + 1)):
        problems.append(f"metrics.jsonl: logged iterations {sorted(losses)[:3]}...{sorted(losses)[-3:]}, expected 1..{expected}")
    if not all(math.isfinite(v) for v in losses.values()):
        problems.append("non-finite loss in metrics.jsonl")
    if summary.get("skipped_steps"):
        problems.append(f"{summary['skipped_steps']} skipped steps in bf16")
    # k-NN of the trained teacher through the CLI (the demo's protocol: 28 px, k = 20, T = 0.07)
    knn_json = c.work / "knn.json"
    device = "cuda" if c.gpu else "cpu"
    t0 = time.monotonic()
    c.run.run(dvtrain("eval", "knn", "-c", str(run_dir), "--train", str(c.data["train"]), "--val", str(c.data["test"]),
                      "--json", str(knn_json), "--image-size", "28", "--resize-size", "28", "--k", "20",
                      "--limit-train", "10000", "--batch-size", "512", "--device", device, "--precision", "bf16"))
    knn = json.loads(knn_json.read_text())
    details["knn_s"] = round(time.monotonic() - t0, 1)
    details["knn_top1"] = knn["per_k"]["20"]["top1"]
    details["knn_bank"] = knn.get("num_train") or knn.get("n_train")
    floor = 50.0 if c.gpu else 20.0  # 10 classes: chance is 10 %; the 450-iteration CPU demo reaches 73 %
    if not details["knn_top1"] >= floor:
        problems.append(f"k-NN top-1 {details['knn_top1']:.2f} % below {floor} %")
    if problems:
        raise StepFailed("; ".join(problems), details)
    return details


def start_interrupted(c: "Check") -> None:
    """Start the run that resume interrupts: a watcher thread sends SIGTERM to the launch process (the
    trainer finishes the step, saves and exits) once its first checkpoint is complete."""
    run_dir = c.work / "interrupted"
    every = 50 if c.gpu else DRY_CKPT_EVERY
    first_ckpt = run_dir / "checkpoints" / f"iter_{every:08d}" / "COMPLETE"
    proc = c.run.popen(_launch_cmd(run_dir, c.smoke_overrides))

    def watch() -> None:
        while proc.poll() is None and not first_ckpt.exists():
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    c.interrupted_proc = proc


def step_resume(c: "Check") -> dict:
    straight = c.work / "smoke"
    if c.results.get("smoke_run", {}).get("status") != "passed" or not (straight / "metrics.jsonl").is_file():
        if c.interrupted_proc is not None:
            kill_group(c.interrupted_proc)
        raise StepFailed("needs the uninterrupted smoke run (smoke_run step) as its reference, which did not pass")
    run_dir = c.work / "interrupted"
    if c.interrupted_proc is None:
        start_interrupted(c)
    proc = c.interrupted_proc
    out = c.run.wait(proc)
    # a launch stopped by a signal exits with 128 + its number (143 for SIGTERM); 0 from older dvtrain versions
    if proc.returncode not in (128 + signal.SIGTERM, 0):
        raise StepFailed(f"interrupted launch exited with {proc.returncode}: {tail(out)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary.get("iterations")
    details = {"signal": "SIGTERM", "stopped_exit_status": proc.returncode, "stopped_status": summary.get("status"),
               "stopped_at": stopped_at}
    total = 200 if c.gpu else DRY_ITERATIONS
    if summary.get("status") != "stopped" or not stopped_at or stopped_at >= total:
        raise StepFailed(f"the SIGTERM did not stop the run mid-way: status {summary.get('status')!r} after "
                         f"{stopped_at} iterations", details)
    c.run.run(_launch_cmd(run_dir, c.smoke_overrides, "--resume"))
    summary = json.loads((run_dir / "summary.json").read_text())
    details["resumed_status"], details["resumed_iterations"] = summary.get("status"), summary.get("iterations")
    a, b = _losses(straight), _losses(run_dir)
    problems = []
    if sorted(b) != list(range(1, total + 1)):
        problems.append(f"interrupted+resumed run logged iterations {sorted(b)[:3]}...{sorted(b)[-3:]}, expected 1..{total}")
    if summary.get("status") != "done" or summary.get("iterations") != total:
        problems.append(f"resumed run: status {summary.get('status')!r} after {summary.get('iterations')} iterations")

    def rel(i: int) -> float:
        return abs(a[i] - b[i]) / max(abs(a[i]), 1e-12)

    common = sorted(set(a) & set(b))
    before = [rel(i) for i in common if i <= stopped_at]
    after = [rel(i) for i in common if i > stopped_at]
    first_after = after[:5]
    noise = max(before[-5:], default=0.0)
    floor = 2e-3 if c.gpu else 1e-4
    limit = max(floor, 10 * noise)
    details.update({"max_rel_diff_before_stop": max(before, default=None), "max_rel_diff_after_resume": max(after, default=None),
                    "max_rel_diff_first5_after_resume": max(first_after, default=None),
                    "rel_diff_last5_before_stop": noise, "limit_first5_after_resume": limit,
                    "losses": {"straight": [a.get(i) for i in range(1, total + 1)],
                               "resumed": [b.get(i) for i in range(1, total + 1)]}})
    if not first_after:
        problems.append("no iterations after the resume to compare")
    elif max(first_after) > limit:
        problems.append(f"losses right after the resume differ from the uninterrupted run by {max(first_after):.2e} "
                        f"(relative; limit {limit:.1e} = max({floor:g}, 10 x the {noise:.1e} before the stop))")
    if problems:
        raise StepFailed("; ".join(problems), details)
    return details


STEPS = [("install", step_install), ("environment", step_environment), ("pytest_gpu", step_pytest_gpu),
         ("bench_kernels", step_bench_kernels), ("train_step", step_train_step), ("smoke_run", step_smoke_run),
         ("resume", step_resume)]


# --------------------------------------------------------------------------------------------------
# The check: run the steps, write JSON + markdown after each
# --------------------------------------------------------------------------------------------------


class Check:
    def __init__(self, out: Path, gpu: bool, wheels: Path | None, work: Path, only: list[str] | None):
        self.out, self.gpu, self.wheels, self.work, self.only = out, gpu, wheels, work, only
        self.budgets = BUDGETS_GPU if gpu else BUDGETS_DRY
        self.results: dict[str, dict] = {}
        self.log_file = (out / "gpu_check.log").open("w")
        env = dict(os.environ, DS_ACCELERATOR="cuda" if gpu else "cpu", WANDB_MODE="offline", WANDB_SILENT="true",
                   PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        for key in ("TRITON_INTERPRET", "WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                    "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        self.run = Runner(self.log_file, env)
        self.convert_procs: list = []
        self.interrupted_proc: subprocess.Popen | None = None
        self.started = time.monotonic()
        self.started_wall = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def execute(self) -> int:
        for name, fn in STEPS:
            if self.only and name not in self.only and name not in ("environment",):
                self.results[name] = {"status": "skipped", "reason": "not selected (--only)", "budget_s": self.budgets[name]}
                continue
            if self.gpu and name != "install" and self.results.get("environment", {}).get("details", {}).get(
                    "cuda_available") is False:
                self.results[name] = {"status": "skipped", "budget_s": self.budgets[name], "reason":
                                      "no CUDA device (see the environment step); --dry-run checks a CPU machine"}
                continue
            if name == "smoke_run" and not self.convert_procs:
                start_conversion(self)
            self.run_step(name, fn)
            if name == "environment" and self.results[name]["status"] == "passed":
                start_conversion(self)  # CPU work that overlaps the GPU steps
            self.write()
        for p in [*self.convert_procs, self.interrupted_proc]:
            if p is not None and p.poll() is None:
                kill_group(p)
        self.write()
        return 0 if self.ok() else 1

    def run_step(self, name: str, fn) -> None:
        budget = self.budgets[name]
        left_total = TOTAL_BUDGET_S - (time.monotonic() - self.started) if self.gpu else math.inf
        entry: dict = {"budget_s": budget}
        self.log_file.write(f"\n{'=' * 30} {name} (budget {budget} s) {'=' * 30}\n")
        if left_total < 5:
            entry.update(status="timed_out", reason=f"the {TOTAL_BUDGET_S} s total budget was spent before this step",
                         duration_s=0.0)
            self.results[name] = entry
            return
        t0 = time.monotonic()
        self.run.deadline = t0 + min(budget, left_total)
        print(f"[gpu_check] {name} (budget {budget} s) ...", flush=True)
        try:
            entry["details"] = fn(self)
            entry["status"] = "passed"
        except StepSkipped as exc:
            entry.update(status="skipped", reason=str(exc))
        except StepTimeout as exc:
            entry.update(status="timed_out", reason=str(exc))
        except StepFailed as exc:
            entry.update(status="failed", reason=str(exc.args[0]))
            if len(exc.args) > 1:
                entry["details"] = exc.args[1]
        except Exception as exc:  # a broken step is reported, and the next one still runs
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:600])
        entry["duration_s"] = round(time.monotonic() - t0, 1)
        self.results[name] = entry
        print(f"[gpu_check] {name}: {entry['status']} in {entry['duration_s']} s"
              + (f" ({entry['reason'][:300]})" if entry.get("reason") else ""), flush=True)

    def ok(self) -> bool:
        return all(r["status"] in ("passed", "skipped") for r in self.results.values())

    def report(self) -> dict:
        return {"schema": 1, "mode": "gpu" if self.gpu else "dry-run", "started": self.started_wall,
                "wall_s": round(time.monotonic() - self.started, 1), "total_budget_s": TOTAL_BUDGET_S if self.gpu else None,
                "budgets_s": self.budgets, "ok": self.ok(),
                "failed": [n for n, r in self.results.items() if r["status"] in ("failed", "timed_out")],
                "host": platform.node(), "command": " ".join(sys.argv), "steps": self.results}

    def write(self) -> None:
        report = self.report()
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(report))
        self.log_file.flush()


def _f(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _md_environment(s: dict, rep: dict, lines: list[str]) -> None:
    env = s.get("environment", {}).get("details") or {}
    if env:
        lines += ["", "## Environment", "", "| | |", "|---|---|"]
        for k in ("gpu", "nvidia_smi", "driver", "capability", "gpu_memory_gib", "cuda_runtime", "cudnn", "nccl", "python",
                  "torch", "triton", "deepspeed", "xformers", "transformers", "mosaicml_streaming", "wandb", "pydantic",
                  "numpy", "cpu", "cpu_count", "deepspeed_accelerator", "install_s", "git_commit", "git_dirty"):
            if k in env:
                lines.append(f"| {k} | {env[k]} |")


def _md_pytest_gpu(s: dict, rep: dict, lines: list[str]) -> None:
    py = s.get("pytest_gpu", {}).get("details")
    if py:
        k = py["kernel_tests_compiled"]
        lines += ["", "## Tests (`pytest -m gpu`, kernels compiled)", "",
                  f"{py['passed']} passed, {len(py['failed'])} failed, {len(py['skipped'])} skipped; kernel tests "
                  f"compiled: {len(k['passed'])} passed, {len(k['failed'])} failed, {len(k['skipped'])} skipped."]
        lines += [f"- failed: {t}" for t in py["failed"]] + [f"- skipped: {t}: {r}" for t, r in py["skipped"].items()]


def _md_bench_kernels(s: dict, rep: dict, lines: list[str]) -> None:
    bk = s.get("bench_kernels", {}).get("details")
    if bk:
        lines += ["", "## Kernels (`dvtrain bench kernels`, full = forward + backward, bf16)", "",
                  "| kernel | shape | ours ms | eager ms | compiled ms | ours / eager | ours / compiled | peak MiB ours / eager |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind in ("swiglu", "koleo"):
            for r in bk.get(kind, []):
                lines.append(f"| {kind} | {r['shape']} | {_f(r['ours_full_ms'])} | {_f(r['eager_full_ms'])} | "
                             f"{_f(r['compiled_full_ms'])} | {_f(r['ours_over_eager'], '.2f')} | "
                             f"{_f(r['ours_over_compiled'], '.2f')} | {_f(r['ours_peak_mib'], '.0f')} / "
                             f"{_f(r['eager_peak_mib'], '.0f')} |")
        lines += [f"- KoLeo {r['shape']}: no B x B buffer: {r['no_bxb_buffer']} (one fp32 B x B = {r['bxb_fp32_mib']:.0f} MiB)"
                  for r in bk.get("koleo", [])]


def _md_train_step(s: dict, rep: dict, lines: list[str]) -> None:
    ts = s.get("train_step", {}).get("details")
    if ts:
        lines += ["", f"## Training steps ({ts['recipe']} {' '.join(ts['overrides']) or '(as shipped)'}, one device, "
                  f"median of {ts['steps']} steps after {ts['warmup']})", "",
                  "| run | variant | precision | act. ckpt | batch | images/s | MFU | step ms | peak GiB | skipped steps |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, _, _, _, _ in TRAIN_RUNS:
            e = ts.get(name)
            if not e:
                continue
            if e.get("status") != "passed":
                lines.append(f"| {name} | {e.get('status')}: {e.get('reason', '')[:120]} | | | | | | | | |")
                continue
            for variant in ("plain", "zero3"):
                if variant in e:
                    v = e[variant]
                    lines.append(f"| {name} | {variant} | {e['precision']} | {'on' if e['act_ckpt'] else 'off'} | "
                                 f"{e['batch']} | {_f(v['images_per_s'], '.1f')} | {_f(v['mfu'], '.3f')} | "
                                 f"{_f(v['step_ms'], '.0f')} | {_f(e['peak_memory_gib'], '.1f')} | {v['skipped_steps']} |")
            if "zero3_over_plain_step_time" in e:
                lines.append(f"| {name} | ZeRO-3 / plain step time | | | | | | {e['zero3_over_plain_step_time']:.3f} | | |")
        for name, why in ts.get("skipped", {}).items():
            lines.append(f"| {name} | skipped: {why} | | | | | | | | |")
        if "act_ckpt_memory_ratio" in ts:
            lines += ["", f"Activation checkpointing memory ratio (on / off): {ts['act_ckpt_memory_ratio']:.2f}"
                      + ("" if rep["mode"] == "gpu" else " (CPU: bytes autograd saves for backward)")]


def _md_smoke_run(s: dict, rep: dict, lines: list[str]) -> None:
    sm = s.get("smoke_run", {}).get("details")
    if sm:
        lines += ["", "## Smoke run (recipes/smoke_cpu.yaml on the bundled Fashion-MNIST)", "",
                  f"- {sm.get('iterations')} iterations, status {sm.get('status')}, {_f(sm.get('images_per_s'), '.0f')} "
                  f"images/s, launch {sm.get('launch_s')} s, MFU {_f(sm.get('mfu_last'))}, peak memory "
                  f"{_f(sm.get('peak_memory_gib'))} GiB, data wait {_f(sm.get('data_wait_fraction_last'))}",
                  f"- loss {_f(sm.get('first_loss'), '.4f')} -> {_f(sm.get('last_loss'), '.4f')}; "
                  f"k-NN top-1 (k = 20): {_f(sm.get('knn_top1'), '.2f')} %"]


def _md_resume(s: dict, rep: dict, lines: list[str]) -> None:
    rs = s.get("resume", {}).get("details")
    if rs:
        lines += ["", "## Interrupted (SIGTERM) and resumed vs uninterrupted", "",
                  f"- stopped at iteration {rs.get('stopped_at')} ({rs.get('stopped_status')}), resumed to "
                  f"{rs.get('resumed_iterations')} ({rs.get('resumed_status')})",
                  f"- per-iteration loss, max relative difference: before the stop {_f(rs.get('max_rel_diff_before_stop'))}, "
                  f"first 5 after the resume {_f(rs.get('max_rel_diff_first5_after_resume'))} (limit "
                  f"{_f(rs.get('limit_first5_after_resume'))}), all after the resume {_f(rs.get('max_rel_diff_after_resume'))}"]


def markdown(rep: dict) -> str:
    s = rep["steps"]
    lines = [f"# dvtrain GPU check ({rep['mode']})", "",
             f"{'PASSED' if rep['ok'] else 'FAILED: ' + ', '.join(rep['failed'])} - {rep['started']}, "
             f"{rep['wall_s']:.0f} s" + (f" of the {rep['total_budget_s']} s budget" if rep["total_budget_s"] else ""),
             "", "| step | status | time s / budget s | note |", "|---|---|---|---|"]
    for name, r in s.items():
        note = (r.get("reason") or "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {name} | {r['status']} | {_f(r.get('duration_s'), '.0f')} / {r['budget_s']} | {note} |")
    for fn in (_md_environment, _md_pytest_gpu, _md_bench_kernels, _md_train_step, _md_smoke_run, _md_resume,):
        try:
            fn(s, rep, lines)
        except (KeyError, TypeError, ValueError) as exc:  # partial details of a failed step
            lines.append(f"\n({fn.__name__[4:]}: details not rendered: {type(exc).__name__} {exc})")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="Directory for gpu_check.json, gpu_check.md and gpu_check.log.")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes; CUDA-only steps reported as skipped.")
    p.add_argument("--wheels", type=Path, default=None, help="Install these wheels offline first (gpu_wheels.sh).")
    p.add_argument("--workdir", type=Path, default=None, help="Keep run directories here (default: a temporary "
                   "directory, deleted at the end).")
    p.add_argument("--only", default=None, help="Comma-separated steps to run (others reported as skipped): "
                   + ",".join(n for n, _ in STEPS))
    args = p.parse_args()
    only = args.only.split(",") if args.only else None
    if only and (bad := [n for n in only if n not in dict(STEPS)]):
        p.error(f"--only: unknown step(s) {bad}; choose from {[n for n, _ in STEPS]}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dvtrain-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), not args.dry_run, args.wheels.resolve() if args.wheels else None, work.resolve(),
                  only)
    try:
        rc = check.execute()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    rep = check.report()
    print("\n" + markdown(rep), flush=True)  # the report last: a caller that keeps only the output's tail sees it
    print(f"[gpu_check] {'PASSED' if rep['ok'] else 'FAILED: ' + ', '.join(rep['failed'])} in {rep['wall_s']:.0f} s; "
          f"{args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
