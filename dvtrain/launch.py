"""``dvtrain launch``: pre-flight validation, run directory, multi-process launch, signals, sweeps.

One process runs in place. ``--nproc N`` (one node) and ``--hostfile F`` (many nodes) re-launch the same
command on every rank through DeepSpeed's launcher (``deepspeed --module dvtrain launch ... --worker``);
clusters that start ranks their own way (torchrun, SLURM srun) run that worker command directly, with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from dvtrain.recipe import (
    RECIPE_PATHS,
    Recipe,
    RecipeError,
    derive,
    dump_recipe,
    load_recipe,
    resolve_ds_config,
)

REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "sftp://", "dbfs:/")


# --------------------------------------------------------------------------------------------------
# Sweeps: the W&B agent passes --dotted.path=value arguments and writes its parameters to a file.
# --------------------------------------------------------------------------------------------------


def overrides_from_extra_args(args: list[str]) -> list[str]:
    """Turn a W&B agent's ``--key=value`` (or ``--key value``) arguments into ``key=value`` overrides.

    Raises:
        RecipeError: an argument that is not ``--dotted.path=value``.
    """
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise RecipeError([f"unexpected argument {arg!r}: recipe overrides look like --optim.base_lr=2e-4"])
        body = arg[2:]
        if "=" not in body:
            if i + 1 >= len(args):
                raise RecipeError([f"argument {arg!r} has no value: use --{body}=VALUE"])
            body = f"{body}={args[i + 1]}"
            i += 1
        out.append(body)
        i += 1
    return out


def overrides_from_sweep_params(path: str | os.PathLike | None = None) -> list[str]:
    """Overrides from the parameter file the W&B agent writes (``WANDB_SWEEP_PARAM_PATH``).

    The file maps each swept parameter to ``{"value": v}``; keys that are recipe paths become
    ``key=value`` overrides (values serialised as YAML so they are parsed like ``--set``).
    """
    path = path or os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        return []
    params = yaml.safe_load(Path(path).read_text()) or {}
    out = []
    for key, spec in params.items():
        if key.startswith("wandb") or key.startswith("_"):
            continue
        value = spec.get("value") if isinstance(spec, dict) else spec
        if key not in RECIPE_PATHS:
            raise RecipeError([f"{path}: swept parameter {key!r} is not a recipe field"])
        out.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


# --------------------------------------------------------------------------------------------------
# Pre-flight validation (before any process starts)
# --------------------------------------------------------------------------------------------------


def check_data_location(location: str, field: str = "data.path") -> None:
    """A local MDS directory must hold ``index.json``; a remote URL must use a scheme streaming knows.

    Raises:
        ValueError: naming the field, the location and what would be valid.
    """
    if "://" in location or location.startswith("dbfs:/"):
        if not location.startswith(REMOTE_SCHEMES):
            raise ValueError(
                f"{field}={location}: unsupported object store; use a local directory or one of "
                + ", ".join(REMOTE_SCHEMES)
            )
        return
    path = Path(location)
    if not path.exists():
        raise ValueError(
            f"{field}={location}: no such directory; convert images first with `dvtrain data convert SRC {location}`"
        )
    if not (path / "index.json").is_file():
        raise ValueError(f"{field}={location}: not an MDS dataset (no index.json); write one with `dvtrain data convert`")


def _comparable(recipe_yaml: str) -> dict:
    """The parts of a recipe that define a run (logging and checkpoint cadence may change on resume)."""
    data = yaml.safe_load(recipe_yaml) or {}
    for key in ("wandb", "checkpoint", "eval", "name"):
        data.pop(key, None)
    data.get("data", {}).pop("num_workers", None)
    data.get("data", {}).pop("cache_dir", None)
    return data


def check_output_dir(run_dir: Path, recipe: Recipe, resume: bool) -> bool:
    """Decide whether ``run_dir`` is new, or the same run to resume.

    Returns:
        True when an existing run in ``run_dir`` is resumed.

    Raises:
        ValueError: the directory holds a different run (its recipe differs), or is a non-empty
            directory that is not a dvtrain run.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return False
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise ValueError(f"--output-dir {run_dir}: not empty and not a dvtrain run directory; choose another")
    old, new = _comparable(saved.read_text()), _comparable(dump_recipe(recipe))
    if old != new:
        diffs = sorted(_diff_paths(old, new))
        raise ValueError(
            f"--output-dir {run_dir} holds a different run (recipe differs at {', '.join(diffs[:5])}); "
            "choose a new output directory"
        )
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    return has_ckpt or resume


def _diff_paths(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def preflight(recipe: Recipe, run_dir: Path, resume: bool, world_size: int) -> bool:
    """Every check that must pass before a process starts; returns whether the run resumes.

    Raises:
        RecipeError / ValueError: with a one-line reason.
    """
    resolve_ds_config(recipe, world_size)
    check_data_location(recipe.data.path)
    if recipe.loss.koleo_weight > 0 and recipe.batch.micro_batch_per_device < 2:
        raise ValueError(
            f"batch.micro_batch_per_device={recipe.batch.micro_batch_per_device}: KoLeo needs >= 2 images per rank"
        )
    return check_output_dir(run_dir, recipe, resume)


# --------------------------------------------------------------------------------------------------
# Multi-process launch through DeepSpeed's launcher
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hostfile_world_size(hostfile: Path) -> int:
    """Total slots in an MPI-style hostfile (``host slots=N`` lines).

    Raises:
        ValueError: a missing file or a malformed line (named with its number).
    """
    if not hostfile.is_file():
        raise ValueError(f"--hostfile {hostfile}: no such file")
    total = 0
    for no, line in enumerate(hostfile.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit():
            raise ValueError(f"--hostfile {hostfile}: line {no} {line!r}: expected 'HOSTNAME slots=N'")
        total += int(slots[0][6:])
    if total == 0:
        raise ValueError(f"--hostfile {hostfile}: no hosts")
    return total


def worker_command(recipe_path: Path, overrides: list[str], run_dir: Path, resume: bool) -> list[str]:
    """The per-rank command (``python -m dvtrain launch ... --worker``) without the interpreter."""
    cmd = ["dvtrain", "launch", str(recipe_path), "--output-dir", str(run_dir), "--worker"]
    for ov in overrides:
        cmd += ["--set", ov]
    if resume:
        cmd.append("--resume")
    return cmd


def deepspeed_command(
    recipe_path: Path, overrides: list[str], run_dir: Path, resume: bool, nproc: int | None,
    hostfile: Path | None, master_port: int | None = None,
) -> list[str]:
    """The ``deepspeed`` launcher command that starts every rank of the run."""
    ds = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        ds += ["--hostfile", str(hostfile)]
        if nproc:
            ds += ["--num_accelerators", str(nproc)]
    else:
        ds += ["--num_nodes", "1", "--num_accelerators", str(nproc or 1)]
    ds += ["--master_port", str(master_port or free_port()), "--module", "--no_local_rank"]
    return ds + worker_command(recipe_path, overrides, run_dir, resume)


def launcher_env(nproc: int) -> dict[str, str]:
    """Environment of the launched ranks: CPU accelerator without CUDA; torch threads x ranks <= cores."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, nproc))))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher, forwarding SIGINT/SIGTERM to it (the ranks checkpoint and exit); its exit code."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------------
# Signals inside a rank: first signal = checkpoint at the next step boundary and exit; second = now.
# --------------------------------------------------------------------------------------------------


class StopRequest:
    """Installs SIGINT/SIGTERM handlers. The first signal sets :attr:`requested` (the loop finishes the
    step, writes a checkpoint and exits cleanly); a second signal exits at once with status 130. The
    last good checkpoint is never touched by an exit at once, since checkpoints are switched into place
    atomically."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            os._exit(130)
        self.requested = True
        self.signum = signum
        print(f"\n[dvtrain] {signal.Signals(signum).name}: finishing this step, writing a checkpoint, then exiting "
              "(send again to exit at once)", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
