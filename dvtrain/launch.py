"""``dvtrain launch``: pre-flight validation, multi-process launch, signals, sweeps, exit status.

The run itself (one rank's loop, resume, metrics, summary) is :func:`dvtrain.train.run.run_worker`.
Exit status of ``dvtrain launch``: 0 done (also: the run had already finished); 130 / 143 stopped by
SIGINT / SIGTERM after writing a checkpoint (or before training started, or at once on a second
signal: the last complete checkpoint is then unchanged); 1 diverged or failed (one message,
``summary.json`` says why). A ``--worker`` rank exits 0 when stopped cleanly, so launchers do not
tear its peers down.

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
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import yaml

from dvtrain.checkpoint.atomic import find_latest_checkpoint
from dvtrain.checkpoint.layout import checkpoint_iteration
from dvtrain.data.remote import check_remote, is_remote
from dvtrain.dist import find_free_port, threads_per_rank
from dvtrain.errors import LAUNCHER_PID_ENV, warn
from dvtrain.recipe import (
    RECIPE_PATHS,
    Recipe,
    RecipeError,
    derive,
    dump_recipe,
    load_recipe,
    precision_advice,
    resolve_ds_config,
)


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
    """A local MDS directory must hold ``index.json``; a remote URL must pass :func:`check_remote`.

    Raises:
        ValueError: naming the field, the location and what would be valid.
    """
    if is_remote(location):
        return check_remote(location, field)  # scheme, credentials, endpoint, index.json; bounded to ~30 s
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
    try:  # through the current schema, so fields added since the run started compare by their defaults
        saved_yaml = dump_recipe(load_recipe(saved))
    except (RecipeError, ValueError):
        saved_yaml = saved.read_text()
    old, new = _comparable(saved_yaml), _comparable(dump_recipe(recipe))
    if old != new:
        diffs = sorted(_diff_paths(old, new))
        raise ValueError(
            f"--output-dir {run_dir} holds a different run (recipe differs at {', '.join(diffs[:5])}); "
            "choose a new output directory"
        )
    from dvtrain.train.run import checkpoint_root

    root = checkpoint_root(recipe, run_dir)
    has_ckpt = find_latest_checkpoint(root) is not None or (root.is_dir() and any(".tmp-" in p.name for p in root.iterdir()))
    return has_ckpt or resume


def _diff_paths(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def check_precision(recipe: Recipe) -> None:
    """fp16 where DeepSpeed cannot run it is an error; a precision that is a poor fit for this machine
    is one warning (:func:`dvtrain.recipe.precision_advice`).

    Raises:
        ValueError: ``precision=fp16`` without CUDA on a CPU whose DeepSpeed accelerator has no fp16
            support (DeepSpeed would stop after building the model with "Type fp16 is not supported").
    """
    import torch

    if recipe.precision == "fp16" and not torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ValueError("precision=fp16: this machine has no CUDA device and DeepSpeed's CPU accelerator has "
                             "no fp16 support on this CPU; use --set precision=bf16 (or fp32)")
    advice = precision_advice(recipe)
    if advice:
        warn(advice)


def preflight(recipe: Recipe, run_dir: Path, resume: bool, world_size: int) -> bool:
    """Every check that must pass before a process starts; returns whether the run resumes.

    Raises:
        RecipeError / ValueError: with a one-line reason.
    """
    resolve_ds_config(recipe, world_size)  # the per-rank batch >= 2 rule is part of recipe validation
    check_precision(recipe)
    check_data_location(recipe.data.path)
    resuming = check_output_dir(run_dir, recipe, resume)
    if not resuming:  # a resumed run reads its own checkpoint, never model.init_from
        from dvtrain.models.init_from import check_init_from

        check_init_from(recipe)
    elif recipe.distill.teacher:
        from dvtrain.train.distill import check_distill_teacher

        check_distill_teacher(recipe)
    from dvtrain.train.distill import teacher_temperature_advice

    advice = teacher_temperature_advice(recipe)  # None without distillation
    if advice:
        warn(advice)
    return resuming


# --------------------------------------------------------------------------------------------------
# Multi-process launch through DeepSpeed's launcher
# --------------------------------------------------------------------------------------------------


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


def worker_command(recipe_path: Path, overrides: list[str], run_dir: Path, resume: bool,
                   verbose: bool = False) -> list[str]:
    """The per-rank command (``python -m dvtrain launch ... --worker``) without the interpreter."""
    cmd = ["dvtrain", "launch", str(recipe_path), "--output-dir", str(run_dir), "--worker"]
    for ov in overrides:
        cmd += ["--set", ov]
    if resume:
        cmd.append("--resume")
    if verbose:
        cmd.append("--verbose")
    return cmd


def deepspeed_command(
    recipe_path: Path, overrides: list[str], run_dir: Path, resume: bool, nproc: int | None,
    hostfile: Path | None, master_port: int | None = None, verbose: bool = False,
) -> list[str]:
    """The ``deepspeed`` launcher command that starts every rank of the run."""
    ds = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        ds += ["--hostfile", str(hostfile)]
        if nproc:
            ds += ["--num_accelerators", str(nproc)]
    else:
        ds += ["--num_nodes", "1", "--num_accelerators", str(nproc or 1)]
    ds += ["--master_port", str(master_port or find_free_port()), "--module", "--no_local_rank",
           "--log_level", "info" if verbose else "warning"]
    return ds + worker_command(recipe_path, overrides, run_dir, resume, verbose)


_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(nproc: int) -> dict[str, str]:
    """Environment of the launched ranks: CPU accelerator without CUDA; torch threads x ranks <= cores."""
    import torch

    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}  # the launcher sets these per rank
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(max(1, nproc))))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _rank_processes(launcher_pid: int) -> list[Any]:
    """The rank processes under a local ``deepspeed`` launcher: the children of its per-node
    ``deepspeed.launcher.launch`` process (not that process, nor the ranks' loader workers or W&B
    service). Empty before they start, after they end, and for ranks that pdsh starts on other nodes.

    Returns:
        ``psutil.Process`` objects.
    """
    try:
        tree = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for proc in tree:
        try:
            if "deepspeed.launcher.launch" in proc.cmdline():
                ranks += proc.children()
        except psutil.Error:
            continue
    return ranks


def run_launcher(cmd: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run the ``deepspeed`` launcher in its own session and pass SIGINT/SIGTERM on to the ranks only.

    The ranks finish their step, write a checkpoint and exit 0 (:class:`StopRequest`). The signal must
    not reach DeepSpeed's launcher processes: ``deepspeed.launcher.launch`` answers one by sending
    SIGTERM to every rank's whole process tree (loader workers, the W&B service) and SIGKILL 30 s
    later, so a Ctrl-C ended in tracebacks and no checkpoint. Before the ranks exist (or when pdsh
    runs them on other nodes) the launcher's session gets SIGTERM, which DeepSpeed's launchers handle
    by tearing the job down without a traceback.

    Returns:
        (the launcher's exit code, the first signal received or None).
    """
    env = dict(env, **{LAUNCHER_PID_ENV: str(os.getpid())})
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        ranks = _rank_processes(proc.pid)
        for rank in ranks:
            try:
                rank.send_signal(signum)
            except psutil.Error:  # it ended meanwhile
                pass
        if not ranks:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait(), (received[0] if received else None)
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

    #: Seconds after the first signal in which further signals count as the same request (launchers
    #: often send SIGINT and then SIGTERM to every rank).
    GRACE_S = 5.0

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._first_at = 0.0
        self._old: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        import time

        if self.signum is not None:
            if time.monotonic() - self._first_at > self.GRACE_S:
                os._exit(130)
            return
        self._first_at = time.monotonic()
        self.requested = True
        self.signum = signum
        if os.environ.get("RANK", "0") != "0":
            return  # every rank gets the signal; rank 0 says it
        print(f"\n[dvtrain] {signal.Signals(signum).name}: finishing this step, writing a checkpoint, then exiting "
              "(send again to exit at once)", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def finished_run(recipe: Recipe, run_dir: Path, world_size: int) -> dict | None:
    """The summary of a run in ``run_dir`` that already finished (status done at its last iteration,
    with that checkpoint present), else None."""
    from dvtrain.train.run import checkpoint_root

    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        return None
    try:
        summary = json.loads(summary_file.read_text())
    except ValueError:
        return None
    total = derive(recipe, world_size).total_iterations
    latest = find_latest_checkpoint(checkpoint_root(recipe, run_dir))
    if summary.get("status") == "done" and latest is not None and checkpoint_iteration(latest) == total:
        return summary
    return None


def exit_code(summary: dict | None, fallback: int = 1) -> int:
    """``dvtrain launch``'s exit status for a run summary (see the module docstring)."""
    from dvtrain.train.run import STATUS_EXIT_CODES

    if not summary:
        return fallback
    if summary.get("status") == "stopped":
        return 128 + int(summary.get("signal") or signal.SIGINT)
    return STATUS_EXIT_CODES.get(summary.get("status"), 1)


def _say(text: str) -> None:
    print(f"[dvtrain] {text}", file=sys.stderr, flush=True)


def launch(
    recipe_path: Path, overrides: list[str], output_dir: Path | None, resume: bool, nproc: int | None,
    hostfile: Path | None, worker: bool, extra_args: list[str] = (), verbose: bool = False,
) -> int:
    """``dvtrain launch``: validate everything, then run in place or start the ranks.

    Args:
        recipe_path: recipe YAML. overrides: ``--set`` values. extra_args: a W&B agent's
            ``--dotted.path=value`` arguments (its parameter file, ``WANDB_SWEEP_PARAM_PATH``, is read too).
        output_dir: run directory (default ``runs/<recipe name>``).
        resume: resume from the run directory's latest checkpoint (automatic when it has one).
        nproc: ranks on this node (through the ``deepspeed`` launcher when > 1).
        hostfile: MPI-style hostfile for multi-node runs (``deepspeed`` launcher, pdsh/ssh).
        worker: this process is one rank started by a launcher (validation already done).
        verbose: show DeepSpeed's INFO lines.

    Returns:
        The exit status (module docstring): 0 done, 130/143 stopped, 1 diverged or failed.

    Raises:
        RecipeError / ValueError: a one-line reason, before any process starts.
    """
    from dvtrain.train.run import checkpoint_root, run_worker

    overrides = list(overrides) + overrides_from_extra_args(list(extra_args)) + overrides_from_sweep_params()
    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(output_dir) if output_dir else Path("runs") / recipe.name
    if worker:
        stop = StopRequest().install()
        summary = run_worker(recipe, run_dir, resume, stop=stop, verbose=verbose)
        stop.uninstall()
        return 0 if summary["status"] == "stopped" else exit_code(summary)
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    world = hostfile_world_size(hostfile) if hostfile else (nproc or 1)
    if hostfile and nproc:
        world = nproc * len([ln for ln in hostfile.read_text().splitlines() if ln.split("#")[0].strip()])
    resuming = preflight(recipe, run_dir, resume, world)
    done = finished_run(recipe, run_dir, world) if resuming else None
    if done is not None:
        _say(f"{run_dir} already finished: iteration {done['iterations']} of {done['total_iterations']}; nothing to do")
        for name in ("last_checkpoint", "teacher_export"):
            if done.get(name):
                _say(f"  {name.replace('_', ' '):<16} {done[name]}")
        _say(f"  {'summary':<16} {run_dir / 'summary.json'}")
        _say("  to train longer, launch with a larger schedule.epochs into a new --output-dir")
        return 0
    if resume and not resuming:
        _say(f"--resume: {run_dir} has no checkpoint yet; starting from iteration 0")
    (run_dir / "summary.json").unlink(missing_ok=True)  # this launch writes its own
    if world == 1 and hostfile is None:
        stop = StopRequest().install()
        try:
            return exit_code(run_worker(recipe, run_dir, resuming, stop=stop, verbose=verbose))
        finally:
            stop.uninstall()
    cmd = deepspeed_command(recipe_path, overrides, run_dir, resuming, nproc, hostfile, verbose=verbose)
    _say(f"starting {world} ranks" + (f": {format_command(cmd)}" if verbose else ""))
    code, signum = run_launcher(cmd, launcher_env(nproc or 1))
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if summary is None and signum is not None:
        # before the ranks started, or a second signal (exit at once): checkpoints are switched into
        # place atomically, so the last complete one is intact
        _say(f"stopped by {signal.Signals(signum).name} before the ranks wrote a summary; the last complete "
             f"checkpoint under {checkpoint_root(recipe, run_dir)}, if any, is unchanged: launch the same "
             "command again to resume from it")
        return 128 + signum
    return exit_code(summary, fallback=code or 1)
