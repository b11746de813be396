"""Small process- and file-level helpers with one owner each (no torch import).

- :func:`free_port`: a free TCP port on 127.0.0.1 (rendezvous of a bare process, the launcher,
  multi-process tests);
- :func:`threads_per_rank`: torch threads per rank so that ranks x threads <= cores;
- :func:`write_json_atomic`: JSON written through a temporary file and a rename, so a reader (or a
  crash) never sees half a file.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["free_port", "threads_per_rank", "usable_cores", "write_json_atomic"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back).

    Returns:
        The port number (int). Another process may take it before the caller binds it; callers that
        can retry on ``EADDRINUSE`` should.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def usable_cores() -> int:
    """Cores this process may run on: ``len(os.sched_getaffinity(0))`` (Linux), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(local_world_size: int, num_cores: int | None = None) -> int:
    """Torch threads per rank so that ranks x threads <= cores (at least 1).

    2 ranks x 2 threads on 2 cores ran ~6x slower than 1 thread each (oversubscription), hence the rule.

    Args:
        local_world_size: processes on this node (>= 1).
        num_cores: usable cores; default :func:`usable_cores`.

    Returns:
        ``max(1, num_cores // local_world_size)``.

    Raises:
        ValueError: ``local_world_size < 1``.
    """
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    if num_cores is None:
        num_cores = usable_cores()
    return max(1, num_cores // local_world_size)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` through ``path.tmp-<pid>`` and a rename.

    Values JSON does not know (paths, numpy scalars, ...) are written with ``str``.

    Args:
        path: destination file; its directory must exist.
        obj: a JSON-able object.
        sort_keys: sort object keys (for files compared byte for byte, e.g. export configs).

    Raises:
        OSError: the directory does not exist or is not writable (the temporary file is removed).
    """
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
