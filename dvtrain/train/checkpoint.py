"""Atomic checkpoint directories and RNG state capture.

A checkpoint is one directory ``<root>/iter_<iteration:08d>``. It is written under a temporary
name (``iter_<n>.tmp-save``) by every rank, and renamed into place by rank 0 only after all ranks
finished writing and the files were fsynced; ``COMPLETE`` is the last file written before the
rename. A crash (exception, kill, power loss) during saving therefore leaves at most a stale
``*.tmp-*`` directory, which the next save removes, and never touches the last good checkpoint.
Only the last ``keep_last`` complete checkpoints are kept.

Multi-node runs need ``<root>`` on a file system shared by all ranks (every rank writes its shard
files into the same directory).

Reference: facebookresearch/dinov2 ``dinov2/fsdp/__init__.py`` (``FSDPCheckpointer`` keeps
``last_checkpoint.rank_N`` pointer files and per-rank shards, written in place; here the switch is
one atomic directory rename).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

__all__ = [
    "COMPLETE_MARKER",
    "checkpoint_name",
    "checkpoint_iteration",
    "list_checkpoints",
    "find_latest_checkpoint",
    "atomic_checkpoint_dir",
    "prune_checkpoints",
    "fsync_tree",
    "capture_rng_state",
    "restore_rng_state",
]

COMPLETE_MARKER = "COMPLETE"
_NAME_RE = re.compile(r"^iter_(\d{8,})$")
_TMP_SUFFIX = ".tmp-save"
_OLD_SUFFIX = ".tmp-old"


def checkpoint_name(iteration: int) -> str:
    """Directory name of the checkpoint after ``iteration`` applied optimizer steps (``iter_00000042``).

    Raises:
        ValueError: negative iteration.
    """
    if iteration < 0:
        raise ValueError(f"checkpoint iteration must be >= 0, got {iteration}")
    return f"iter_{iteration:08d}"


def checkpoint_iteration(path: str | Path) -> int | None:
    """Iteration encoded in a checkpoint directory name, or None for any other name."""
    m = _NAME_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (named ``iter_N`` and holding ``COMPLETE``), oldest first.

    Temporary (``*.tmp-*``) and incomplete directories are ignored. A missing root gives [].
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        it = checkpoint_iteration(child)
        if it is not None and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((it, child))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on platforms that cannot open them
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under ``path`` (and ``path`` itself), deepest first."""
    path = Path(path)
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_checkpoint_dir(
    root: str | Path,
    iteration: int,
    *,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    all_ok: Callable[[bool], bool] = lambda ok: ok,
) -> Iterator[Path]:
    """Context manager yielding a temporary directory that becomes ``<root>/iter_<n>`` on success.

    Every rank enters the context (collective). Protocol:
        rank 0 removes a stale temporary directory and creates a fresh one; barrier; every rank writes
        into the yielded path; ``all_ok(my_ok)`` agrees on success (an all-reduce in multi-rank
        runs); on success rank 0 fsyncs the tree, writes ``COMPLETE``, renames into place (an
        existing checkpoint of the same iteration is first moved aside, then deleted) and fsyncs
        ``root``; barrier. On failure on any rank the temporary directory stays (removed by the next
        save), the final name is untouched, and every rank raises.

    Args:
        root: checkpoint root directory (created when missing).
        iteration: applied optimizer steps at this checkpoint.
        is_main: this process is rank 0.
        barrier: waits for all ranks (``dvtrain.dist.barrier``).
        all_ok: maps this rank's success flag to the global one (AND over ranks).

    Yields:
        Path of the temporary directory to write into.

    Raises:
        RuntimeError: another rank failed while saving (this rank's own exception propagates as is).
    """
    root = Path(root)
    final = root / checkpoint_name(iteration)
    tmp = root / (final.name + _TMP_SUFFIX)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        # A failing rank still takes part in the agreement so the others do not hang.
        everyone_ok = all_ok(ok)
    if not everyone_ok:
        raise RuntimeError(f"checkpoint {final} was not written: another rank failed while saving; "
                           f"the previous checkpoint is intact")
    if is_main:
        fsync_tree(tmp)
        marker = tmp / COMPLETE_MARKER
        marker.write_text(f"{iteration}\n")
        _fsync_path(marker)
        _fsync_path(tmp)
        old = None
        if final.exists():
            old = root / (final.name + _OLD_SUFFIX)
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temporary directories
    of iterations older than the newest checkpoint. Call on rank 0 only.

    Args:
        root: checkpoint root.
        keep_last: how many complete checkpoints survive (>= 1).

    Returns:
        The deleted paths.

    Raises:
        ValueError: ``keep_last < 1``.
    """
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(root)
    doomed = ckpts[:-keep_last]
    newest = checkpoint_iteration(ckpts[-1]) if ckpts else None
    if newest is not None:
        for child in Path(root).iterdir():
            if ".tmp-" in child.name and child.is_dir():
                it = checkpoint_iteration(child.name.split(".tmp-")[0])
                if it is not None and it < newest:
                    doomed.append(child)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python ``random``, numpy global, torch CPU and (when present) CUDA.

    Returns:
        dict with keys ``python``, ``numpy``, ``torch`` (uint8 tensor) and ``cuda`` (list of uint8
        tensors, one per visible device, or None).
    """
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned (CUDA states only when CUDA is present).

    Raises:
        ValueError: ``state`` lacks one of the keys python, numpy, torch.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; it was not written by capture_rng_state()")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
