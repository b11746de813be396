"""User-facing error handling shared by every CLI command.

A user error (a bad recipe, file, field, sample or option) is one message on stderr and exit status 1,
without a traceback; Ctrl-C is one line and exit status 130; anything else is a bug and keeps its
traceback. A warning (:func:`warn`) is one line on stderr and changes no exit status.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer
from rich.console import Console

from dvtrain.recipe import RecipeError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

#: Exceptions that carry a message meant for the user.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


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
            err_console.print("stopped (Ctrl-C)")
            raise typer.Exit(130) from None

    return wrapper


def run_user_command(fn: Callable[[], Any]) -> Any:
    """Run a command body under :func:`user_errors`."""
    return user_errors(fn)()
