"""User-facing error handling shared by every CLI command.

A user error (a bad recipe, file, field, sample or option) is one message on stderr and exit status 1,
without a traceback; Ctrl-C is one line and exit status 130; anything else is a bug and keeps its
traceback. A warning (:func:`warn`) is one line on stderr and changes no exit status.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, NoReturn

import typer
from rich.console import Console

from dvtrain.recipe import RecipeError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

#: Exceptions that carry a message meant for the user.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)

#: Set by ``dvtrain launch`` in the environment of the ranks it starts (:func:`dvtrain.launch.run_launcher`):
#: that process passes a Ctrl-C on to them and reports the stop itself.
LAUNCHER_PID_ENV = "DVTRAIN_LAUNCHER_PID"


def report(exc: BaseException) -> None:
    """Print a user error: each problem of a :class:`RecipeError` on its own line."""
    for problem in exc.problems if isinstance(exc, RecipeError) else [str(exc)]:
        err_console.print(f"[red]error:[/red] {problem}", markup=True)


def warn(message: str) -> None:
    """Print one warning line on stderr (``warning: ...``): something the user should fix, not an error."""
    err_console.print(f"[yellow]warning:[/yellow] {message}", markup=True)


def user_errors(fn: Callable) -> Callable:
    """Decorator for command functions: user errors -> message + exit 1 (no traceback); Ctrl-C ->
    "stopped (Ctrl-C)" + exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            report(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # Ctrl-C: stopped, not failed (the exit status of a SIGINT)
            if os.environ.get(LAUNCHER_PID_ENV):
                # a rank of `dvtrain launch --nproc N`, stopped before its training loop: no line (the
                # launching process prints one); the non-zero status makes DeepSpeed's launcher end the
                # peers, which may be waiting for this rank in the rendezvous
                raise typer.Exit(130) from None
            stopped("stopped (Ctrl-C)")

    return wrapper


def stopped(message: str) -> NoReturn:
    """End a command stopped by Ctrl-C: print ``message``, ignore further Ctrl-C while the process
    winds down (an impatient second one must not turn the exit into a kill), exit status 130."""
    import signal

    err_console.print(message)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise typer.Exit(130)


def run_user_command(fn: Callable[[], Any]) -> Any:
    """Run a command body under :func:`user_errors`."""
    return user_errors(fn)()
