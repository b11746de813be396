"""Fault injection for crash tests of the product (``DVTRAIN_FAULT``), read in one place.

``DVTRAIN_FAULT="kind:iteration[,kind:iteration...]"`` with kinds:

- ``sigint`` / ``sigterm`` / ``sigkill``: rank 0 sends itself that signal right after the step that
  reached ``iteration`` (as if a user or a scheduler had sent it during that step). SIGINT goes where
  a terminal's Ctrl-C goes: to the process group of the ``dvtrain launch`` that started the ranks
  (``dvtrain.errors.LAUNCHER_PID_ENV``), else to rank 0's own group when it leads one (one process:
  its loader workers too);
- ``kill_in_save``: rank 0 SIGKILLs itself while writing the checkpoint of ``iteration``, after the
  engine's files and before ``COMPLETE``.

Unset in normal runs; the acceptance tests (tests/test_resume_launch.py) use it to interrupt
``dvtrain launch`` at exact points.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "fault_at", "maybe_signal_self"]

FAULT_ENV = "DVTRAIN_FAULT"
_SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}


def _faults() -> list[tuple[str, int]]:
    spec = os.environ.get(FAULT_ENV, "").strip()
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, at = item.partition(":")
        if kind not in (*_SIGNALS, "kill_in_save") or not at.isdigit():
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kind:iteration with kind in "
                             f"{sorted((*_SIGNALS, 'kill_in_save'))}")
        out.append((kind, int(at)))
    return out


def fault_at(kind: str, iteration: int) -> bool:
    """True when ``DVTRAIN_FAULT`` asks for ``kind`` at ``iteration``."""
    return (kind, iteration) in _faults()


def maybe_signal_self(iteration: int, rank: int) -> None:
    """On rank 0, send the signal ``DVTRAIN_FAULT`` names for ``iteration``, if any (module docstring)."""
    if rank != 0:
        return
    for kind, sig in _SIGNALS.items():
        if fault_at(kind, iteration):
            from dvtrain.errors import LAUNCHER_PID_ENV  # noqa: PLC0415 - the rank has imported it already

            launcher = os.environ.get(LAUNCHER_PID_ENV)
            if sig == signal.SIGINT and launcher:
                os.killpg(os.getpgid(int(launcher)), sig)
            elif sig == signal.SIGINT and os.getpgid(0) == os.getpid():
                os.killpg(os.getpid(), sig)
            else:
                os.kill(os.getpid(), sig)
