"""The checkpointer: saves and restores a run's state as a set of stateful parts.

In the spirit of torchtitan's ``CheckpointManager``: the trainer hands over named parts, each with
``state_dict()`` / ``load_state_dict()``; the checkpointer owns where they go (file names from
:mod:`dvtrain.checkpoint.layout`), the atomic directory protocol (:mod:`dvtrain.checkpoint.atomic`),
retention and crash recovery. Parts:

- the engine (``save(directory)`` / ``load(directory)``): DeepSpeed's checkpoint plus the teacher's
  fp32 shards, one file per rank;
- per-rank parts (``rng``): one file per rank;
- global parts (``train_state``, ``data``, ``run``): identical on every rank, written by rank 0;
- the resolved recipe as text.

Every file except DeepSpeed's own is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from dvtrain.checkpoint import layout
from dvtrain.faults import fault_at
from dvtrain.checkpoint.atomic import (
    atomic_checkpoint_dir,
    find_latest_checkpoint,
    prune_checkpoints,
    recover_checkpoints,
)

__all__ = ["Checkpointer", "Stateful"]

log = logging.getLogger(__name__)

#: Global parts and their files.
GLOBAL_FILES = {"train_state": layout.TRAIN_STATE_FILE, "data": layout.DATA_FILE, "run": layout.RUN_FILE}
#: Per-rank parts and their file templates.
RANK_FILES = {"rng": layout.RNG_FILE}


class Stateful(Protocol):
    """Anything the checkpointer can save: ``state_dict()`` of plain types and tensors, and its inverse."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EngineLike(Protocol):
    """The engine part writes and reads a directory itself (collective)."""

    def save(self, directory: str | Path) -> None: ...

    def load(self, directory: str | Path) -> None: ...


class Checkpointer:
    """Save/load the run state under ``root`` (collective calls: every rank).

    Args:
        root: checkpoint root (``<run_dir>/checkpoints`` or ``checkpoint.dir``), shared by all ranks.
        rank: this process's rank. world_size: number of ranks.
        keep_last: complete checkpoints kept (older ones are deleted after each save).
        barrier: waits for all ranks. all_ok: AND of a success flag over ranks.
    """

    def __init__(self, root: str | Path, *, rank: int, world_size: int, keep_last: int,
                 barrier: Callable[[], None], all_ok: Callable[[bool], bool]) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.barrier = barrier
        self.all_ok = all_ok

    # ------------------------------------------------------------------ discovery
    def recover(self) -> list[str]:
        """Finish or clear what a crash during a save left (rank 0 acts; collective). Returns what was done."""
        actions = recover_checkpoints(self.root) if self.rank == 0 else []
        self.barrier()
        return actions

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return find_latest_checkpoint(self.root)

    # ------------------------------------------------------------------ save / load
    def save(self, iteration: int, engine: EngineLike, parts: Mapping[str, Stateful], recipe_yaml: str) -> Path:
        """Write ``<root>/iter_<iteration>`` atomically and prune to ``keep_last``.

        Args:
            iteration: applied optimizer steps.
            engine: the engine part. parts: stateful parts by name (keys of ``GLOBAL_FILES`` /
                ``RANK_FILES``). recipe_yaml: the resolved recipe.

        Returns:
            The checkpoint directory.

        Raises:
            KeyError: a part name the layout does not know.
            RuntimeError: another rank failed while saving (the previous checkpoint stays the latest).
        """
        unknown = set(parts) - set(GLOBAL_FILES) - set(RANK_FILES)
        if unknown:
            raise KeyError(f"checkpoint parts {sorted(unknown)} are not in the layout")
        is_main = self.rank == 0
        with atomic_checkpoint_dir(self.root, iteration, is_main=is_main, barrier=self.barrier,
                                   all_ok=self.all_ok) as tmp:
            engine.save(tmp)
            for name, template in RANK_FILES.items():
                if name in parts:
                    torch.save(parts[name].state_dict(), tmp / layout.rank_file(template, self.rank))
            if is_main:
                if fault_at("kill_in_save", iteration):  # crash tests (dvtrain.faults)
                    os.kill(os.getpid(), signal.SIGKILL)
                for name, file in GLOBAL_FILES.items():
                    if name in parts:
                        torch.save(parts[name].state_dict(), tmp / file)
                (tmp / layout.RECIPE_FILE).write_text(recipe_yaml)
        if is_main:
            prune_checkpoints(self.root, self.keep_last)
        self.barrier()
        return self.root / layout.checkpoint_name(iteration)

    def load(self, path: str | Path, engine: EngineLike, parts: Mapping[str, Stateful],
             check: Callable[[dict[str, Any]], None] | None = None) -> Path:
        """Restore a checkpoint (collective, before the first step).

        Args:
            path: a checkpoint directory or a root (its newest complete checkpoint is used).
            engine: the engine part. parts: stateful parts by name; each one found in the checkpoint is
                restored (a part missing from an older checkpoint is left as it is).
            check: called with the train state before anything is restored (e.g. to refuse another
                world size); raises to refuse.

        Returns:
            The checkpoint directory that was restored.

        Raises:
            ValueError: no complete checkpoint at ``path``, or missing files.
        """
        path = Path(path)
        if layout.checkpoint_iteration(path) is None or not (path / layout.COMPLETE_MARKER).is_file():
            latest = find_latest_checkpoint(path)
            if latest is None:
                raise ValueError(f"{path}: no complete checkpoint (iter_NNNNNNNN with {layout.COMPLETE_MARKER})")
            path = latest
        states: dict[str, Any] = {}
        for name, file in GLOBAL_FILES.items():
            if name in parts and (path / file).is_file():
                states[name] = torch.load(path / file, map_location="cpu", weights_only=True)
        if "train_state" in parts and "train_state" not in states:
            raise ValueError(f"{path}: missing {layout.TRAIN_STATE_FILE}; not a complete dvtrain checkpoint")
        if check is not None and "train_state" in states:
            check(states["train_state"])
        engine.load(path)
        for name, state in states.items():
            parts[name].load_state_dict(state)
        for name, template in RANK_FILES.items():
            file = path / layout.rank_file(template, self.rank)
            if name in parts:
                if not file.is_file():
                    raise ValueError(f"{path}: missing {file.name}")
                parts[name].load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        self.barrier()
        return path
