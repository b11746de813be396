"""Atomic checkpoint directories, crash recovery, retention and atomic JSON files.

A checkpoint is one directory ``<root>/iter_<iteration:08d>`` (names: :mod:`dvtrain.checkpoint.layout`).
It is written under a temporary name (``iter_<n>.tmp-save``) by every rank, and renamed into place
by rank 0 only after all ranks finished writing and the files were fsynced; ``COMPLETE`` is the last
file written before the rename. A crash (exception, kill, power loss) during saving therefore leaves
at most a temporary directory, which :func:`recover_checkpoints` clears at the next start (or
finishes, when it was complete), and never touches the last good checkpoint. Only the last
``keep_last`` complete checkpoints are kept.

Multi-node runs need ``<root>`` on a file system shared by all ranks (every rank writes its shard
files into the same directory).

Reference: facebookresearch/dinov2 ``dinov2/fsdp/__init__.py`` (``FSDPCheckpointer`` keeps
``last_checkpoint.rank_N`` pointer files and per-rank shards, written in place; here the switch is
one atomic directory rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from dvtrain.checkpoint.layout import (
    COMPLETE_MARKER,
    OLD_SUFFIX,
    TMP_SUFFIX,
    checkpoint_iteration,
    checkpoint_name,
)

__all__ = [
    "list_checkpoints",
    "find_latest_checkpoint",
    "atomic_checkpoint_dir",
    "prune_checkpoints",
    "recover_checkpoints",
    "fsync_tree",
    "write_json_atomic",
]


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
    tmp = root / (final.name + TMP_SUFFIX)
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
            old = root / (final.name + OLD_SUFFIX)
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


def recover_checkpoints(root: str | Path) -> list[str]:
    """Clear what a crash during a save left under ``root``; call on rank 0 before any save or load.

    - ``iter_N.tmp-save`` holding ``COMPLETE`` and no ``iter_N``: the crash hit between the marker and
      the rename; the directory is complete and fsynced, so it is renamed into place.
    - ``iter_N.tmp-old`` and no ``iter_N``: the crash hit while replacing ``iter_N``; it moves back.
    - any other ``*.tmp-*`` directory: an unfinished save; removed.

    Returns:
        One line per action, for the console.
    """
    root = Path(root)
    actions: list[str] = []
    if not root.is_dir():
        return actions
    for child in sorted(root.iterdir()):
        if not child.is_dir() or ".tmp-" not in child.name:
            continue
        base = child.name.split(".tmp-")[0]
        final = root / base
        if checkpoint_iteration(base) is not None and not final.exists() and (child / COMPLETE_MARKER).is_file() \
                and child.name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
            os.replace(child, final)
            _fsync_path(root)
            actions.append(f"completed interrupted checkpoint {final.name}")
        else:
            shutil.rmtree(child, ignore_errors=True)
            actions.append(f"removed unfinished checkpoint {child.name}")
    return actions


def write_json_atomic(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file, fsync and a rename: a
    crash leaves the old file or the new one, never a torn one. Non-JSON values go through ``str``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, default=str, sort_keys=sort_keys) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
