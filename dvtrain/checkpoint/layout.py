"""The one definition of a dvtrain training checkpoint's layout: every directory, file and key.

A run directory holds ``checkpoints/iter_<iteration:08d>/`` (:func:`checkpoint_name`), each one
complete when it holds :data:`COMPLETE_MARKER`. Inside::

    COMPLETE                      last file written; holds the iteration
    recipe.yaml                   the resolved recipe (RECIPE_FILE)
    train_state.pt                rank 0: iteration, counters, collapse monitor, centers (TRAIN_STATE_FILE)
    data.pt                       rank 0: the data loader's position (DATA_FILE; same on every rank)
    run.pt                        rank 0: the metrics / W&B run identity (RUN_FILE)
    rng_rank<r>.pt                each rank: python, numpy, torch CPU/CUDA RNG states (RNG_FILE)
    teacher_rank<r>.pt            each rank: its teacher fp32 EMA shards (TEACHER_FILE, TEACHER_KEYS)
    ds/                           DeepSpeed's own checkpoint: module, student fp32 masters, AdamW
                                  state, loss scaler (DS_TAG)

While a checkpoint is written it is named ``iter_<n>.tmp-save`` (TMP_SUFFIX); a checkpoint being
replaced is moved aside as ``iter_<n>.tmp-old`` (OLD_SUFFIX). Writers: :mod:`dvtrain.checkpoint.manager`
(training), readers: the same and :mod:`dvtrain.checkpoint.backbone` (eval/export/viz, offline).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "CHECKPOINTS_DIR", "COMPLETE_MARKER", "TMP_SUFFIX", "OLD_SUFFIX", "RECIPE_FILE", "TRAIN_STATE_FILE",
    "DATA_FILE", "RUN_FILE", "RNG_FILE", "TEACHER_FILE", "TEACHER_KEYS", "TRAIN_STATE_KEYS", "DS_TAG",
    "checkpoint_name", "checkpoint_iteration", "rank_file", "rank_files_glob",
]

#: Sub-directory of a run directory that holds its checkpoints (``checkpoint.dir`` overrides it).
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TMP_SUFFIX = ".tmp-save"
OLD_SUFFIX = ".tmp-old"
RECIPE_FILE = "recipe.yaml"
TRAIN_STATE_FILE = "train_state.pt"
DATA_FILE = "data.pt"
RUN_FILE = "run.pt"
RNG_FILE = "rng_rank{rank:05d}.pt"
TEACHER_FILE = "teacher_rank{rank:05d}.pt"
#: DeepSpeed checkpoint tag: DeepSpeed writes its files under ``<checkpoint>/ds/``.
DS_TAG = "ds"

#: Keys of a teacher shard file: parameter names, the numel of each local shard, the fp32 shards
#: (1-D under ZeRO-3: this rank's equal, padded partition; full tensors at stages 0-2), and where they came from.
TEACHER_KEYS = ("names", "numels", "masters", "zero_stage", "world_size", "rank")
#: Keys of ``train_state.pt`` (see ``dvtrain.train.trainer.Trainer.state_dict``).
TRAIN_STATE_KEYS = ("iteration", "consecutive_skips", "nonfinite_steps", "world_size", "global_batch", "lr",
                    "collapse", "buffers")

_NAME_RE = re.compile(r"^iter_(\d{8,})$")


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


def rank_file(template: str, rank: int) -> str:
    """``RNG_FILE`` / ``TEACHER_FILE`` for one rank."""
    return template.format(rank=rank)


def rank_files_glob(template: str) -> str:
    """Glob pattern matching ``template`` for every rank."""
    return template.replace("{rank:05d}", "*")
