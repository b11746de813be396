"""``python -m dvtrain`` and the ``dvtrain`` console script (:func:`main`; the deepspeed launcher
runs the module).

Importing the CLI takes seconds (torch, DeepSpeed); a Ctrl-C during that import is one line and
exit status 130 like a Ctrl-C later (:func:`dvtrain.errors.user_errors`), not a traceback; in a rank
that ``dvtrain launch --nproc N`` started, no line (that process reports the stop).
"""

import os
import sys


def main() -> None:
    """Import and run the Typer app."""
    try:
        from dvtrain.cli import app
    except KeyboardInterrupt:
        # in a rank that `dvtrain launch --nproc N` started, that process reports the stop
        # (dvtrain.errors.LAUNCHER_PID_ENV, spelled out: importing it is what was interrupted)
        if not os.environ.get("DVTRAIN_LAUNCHER_PID"):
            print("stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    app()


if __name__ == "__main__":
    main()
