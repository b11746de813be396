"""Process-group setup and rank helpers (DeepSpeed's communication layer underneath).

One process per accelerator (CUDA: NCCL) or several CPU processes (gloo). Every rank reads its
place from the standard launcher environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``: torchrun, ``deepspeed``, ``dvtrain launch``);
a bare ``python`` process becomes a world of one on 127.0.0.1 with a free port.

Thread rule: ranks on a node x torch threads per rank must not exceed the node's cores (2 ranks x
2 threads on 2 cores ran ~6x slower than 1 thread each). :func:`threads_per_rank` computes the
share, :func:`init_distributed` applies it on CPU.

Reference: facebookresearch/dinov2 ``dinov2/distributed/__init__.py`` (SLURM/torchrun env parsing);
here DeepSpeed's ``deepspeed.init_distributed`` creates the group so ``deepspeed.comm`` and
``torch.distributed`` share it.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

#: What torch's extension builder reports when ninja was stopped by SIGINT.
NINJA_INTERRUPTED = "ninja: build stopped: interrupted by user"

__all__ = [
    "DistInfo",
    "find_free_port",
    "threads_per_rank",
    "init_distributed",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main_process",
    "barrier",
    "device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits.

    Attributes:
        rank: global rank, 0..world_size-1.
        world_size: number of processes.
        local_rank: rank on this node (selects the CUDA device).
        local_world_size: processes on this node.
        backend: ``"nccl"`` (CUDA) or ``"gloo"`` (CPU).
        device: ``cuda:<local_rank>`` or ``cpu``.
        num_threads: torch intra-op threads of this process.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    num_threads: int


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads_per_rank(local_world_size: int, num_cores: int | None = None) -> int:
    """Torch threads per rank so that ranks x threads <= cores (at least 1).

    Args:
        local_world_size: processes on this node (>= 1).
        num_cores: usable cores; default ``len(os.sched_getaffinity(0))`` (or ``os.cpu_count()``).

    Returns:
        ``max(1, num_cores // local_world_size)``.

    Raises:
        ValueError: ``local_world_size < 1``.
    """
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    if num_cores is None:
        try:
            num_cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            num_cores = os.cpu_count() or 1
    return max(1, num_cores // local_world_size)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0, set_threads: bool = True) -> DistInfo:
    """Create (or reuse) the process group through ``deepspeed.init_distributed``.

    Idempotent: a second call returns the current placement. Sets ``DS_ACCELERATOR=cpu`` when no
    CUDA device exists (before DeepSpeed picks an accelerator), fills ``MASTER_ADDR``/``MASTER_PORT``/
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` for a single bare process, selects the CUDA device of
    ``LOCAL_RANK``, and on CPU sets torch threads to :func:`threads_per_rank` unless the user
    fixed ``OMP_NUM_THREADS``.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (nccl with CUDA, else gloo).
        timeout_s: collective timeout, seconds.
        set_threads: apply the thread rule on CPU.

    Returns:
        :class:`DistInfo`.

    Raises:
        ValueError: malformed launcher environment (non-integer ranks, rank >= world size).
        KeyboardInterrupt: a Ctrl-C interrupted DeepSpeed's one-time build of its CPU communication
            op (ninja gets the signal too and fails the build; this turns it into the stop it was).
    """
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    rank_, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    # DeepSpeed's launcher exports LOCAL_SIZE; torchrun and mosaicml-streaming use LOCAL_WORLD_SIZE
    # (streaming takes a missing one as 1 and then every rank thinks it leads its node).
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world)))
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank_ < world:
        raise ValueError(f"RANK={rank_} must be in [0, WORLD_SIZE={world})")
    backend = backend or ("nccl" if has_cuda else "gloo")
    dev = torch.device("cuda", local) if has_cuda else torch.device("cpu")
    if has_cuda:
        torch.cuda.set_device(dev)

    threads = torch.get_num_threads()
    if set_threads and not has_cuda and "OMP_NUM_THREADS" not in os.environ:
        threads = threads_per_rank(local_world)
        torch.set_num_threads(threads)

    if not torch_dist.is_initialized():
        import deepspeed  # noqa: PLC0415 - heavy import, only when a group is made

        _forget_deepspeed_groups()
        if rank_ == 0 and _shm_op_needs_build():
            print("[dvtrain] building DeepSpeed's CPU communication op (once per machine and torch version; "
                  "about 30 s on 2 cores)", file=sys.stderr, flush=True)
        try:
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                rank=rank_,
                world_size=world,
            )
        except RuntimeError as exc:
            if NINJA_INTERRUPTED not in str(exc):
                raise
            # On CPU, DeepSpeed builds its shared-memory communication op with ninja the first time
            # (the torch_extensions cache). A Ctrl-C reaches ninja too (same process group) and ends
            # that build with this RuntimeError: a stop, not a failure.
            if rank_ == 0:
                print("[dvtrain] Ctrl-C stopped DeepSpeed's one-time build of its CPU communication op; "
                      "the next launch builds it again", file=sys.stderr, flush=True)
            raise KeyboardInterrupt from None
        if not has_cuda:
            _unlink_shm_workspace(rank_, world, local_world)
    return DistInfo(rank_, world, local, local_world, backend, dev, threads)


def _unlink_shm_workspace(rank_: int, world: int, local_world: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory allreduce workspace once every rank has mapped it.

    The workspace (about 66 MB) is
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp: shm_initialize``). DeepSpeed creates one per rank when all
    ranks share a node (its ``shm_interface.cpp`` checks ``LOCAL_SIZE == WORLD_SIZE``; the deepspeed
    launcher exports ``LOCAL_SIZE``) and never unlinks it (``shared_close`` is never called), so every
    multi-process CPU run left
    ``world x 66 MB`` in ``/dev/shm`` (RAM) behind: 4 GiB after a day of test runs.
    ``shm_initialize`` returns only after a rank has mapped every peer's segment, so after a barrier
    each rank can unlink its own: the mappings stay valid until the processes exit, and nothing is
    left behind when the run later crashes or is killed. The barrier follows ``local_world == world``,
    the same on every rank.
    """
    if local_world != world:
        return  # several nodes: no shared-memory workspace
    if world > 1:
        torch_dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    try:
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank_}")
    except FileNotFoundError:
        pass


def _shm_op_needs_build() -> bool:
    """True when ``deepspeed.init_distributed`` is about to JIT-build DeepSpeed's CPU shared-memory
    communication op (``deepspeed/comm/torch.py: build_shm_op``: CPU accelerator, op compatible, no
    ``deepspeed_shm_comm.so`` in the torch extensions cache yet); False when built or unknown."""
    try:
        from deepspeed.accelerator import get_accelerator  # noqa: PLC0415
        from deepspeed.ops import __compatible_ops__  # noqa: PLC0415
        from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC0415

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not __compatible_ops__.get(builder.NAME, False):
            return False
        build_dir = _get_build_directory(builder.NAME, verbose=False)
    except Exception:  # noqa: BLE001 - a notice only; never stop a launch over it
        return False
    return not os.path.isfile(os.path.join(build_dir, f"{builder.NAME}.so"))


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached process-group handles before a new group is created.

    ``deepspeed.utils.groups`` caches the world / data-parallel groups of the first engine. A process
    that destroys its group and creates a new one (tests, notebooks, in-process restarts) would
    otherwise hand DeepSpeed handles of the destroyed group ("Group ... is not registered").
    """
    from deepspeed.utils import groups  # noqa: PLC0415

    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_SEQUENCE_PARALLEL_GROUP", "_SEQUENCE_DATA_PARALLEL_GROUP"):
        if getattr(groups, name, None) is not None:
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        cached = getattr(groups, name, None)
        if isinstance(cached, dict):
            cached.clear()


def is_initialized() -> bool:
    """A torch.distributed process group exists."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank on this node, from ``LOCAL_RANK`` (0 when unset)."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """Global rank 0."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


def device() -> torch.device:
    """This rank's compute device: ``cuda:<LOCAL_RANK>`` when CUDA exists, else CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
