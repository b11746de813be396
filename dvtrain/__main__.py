"""``python -m dvtrain`` = the ``dvtrain`` console script (used by the deepspeed launcher)."""

from dvtrain.cli import app

if __name__ == "__main__":
    app()
