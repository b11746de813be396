"""Run observability: ``metrics.jsonl``, Weights & Biases, and a rich progress bar (rank 0 only).

W&B mode ``auto`` is online when an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry
for the W&B host) and offline otherwise; offline runs keep their files under ``<run_dir>/wandb`` and
can be uploaded later with ``wandb sync``. The W&B run id is part of the run state saved in every
checkpoint (``dvtrain.train.run.RunIdentity``), so a resumed launch continues the same W&B run; on
resume ``metrics.jsonl`` is cut back to the resumed iteration, so each iteration appears once.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dvtrain.recipe import Recipe


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> ``online`` if an API key is configured, else ``offline``; other modes unchanged."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Metrics sink of one run: JSON lines + W&B (rank 0); other ranks drop everything.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``wandb/`` go there).
        recipe: the resolved recipe, stored as the W&B run config.
        rank: this process's rank; only rank 0 writes.
        run_id: the W&B run id (continued when it exists: ``resume="allow"``).
        resume_iteration: the iteration training starts from (0 for a fresh start): rows of later
            iterations (logged by a killed launch after its last checkpoint, replayed now) are
            removed from ``metrics.jsonl`` first; None keeps the file as it is.
        mode: W&B mode, ``auto`` | ``online`` | ``offline`` | ``disabled`` (default: the recipe's).
        extra_config: more config values for W&B (world size, derived values).
    """

    def __init__(self, run_dir: Path, recipe: Recipe, rank: int = 0, run_id: str | None = None,
                 resume_iteration: int | None = None, mode: str | None = None, extra_config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.mode = resolve_wandb_mode(mode or recipe.wandb.mode)
        self._wandb_run = None
        self._metrics_file = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        if resume_iteration is not None and metrics_path.is_file():
            truncate_metrics(metrics_path, resume_iteration)
        self._metrics_file = open(metrics_path, "a", buffering=1)
        if self.mode == "disabled":
            return
        import wandb

        # Our own W&B service: one inherited through WANDB_SERVICE (a parent process that used W&B) would
        # keep a killed launch's run registered, and the relaunch with the same id would be refused
        # ("run ID ... is in use").
        os.environ.pop("WANDB_SERVICE", None)
        config = recipe.model_dump(mode="json")
        config.update(extra_config or {})
        self._wandb_run = wandb.init(
            project=recipe.wandb.project,
            entity=recipe.wandb.entity,
            name=recipe.name,
            tags=recipe.wandb.tags,
            config=config,
            dir=str(self.run_dir),
            mode=self.mode,
            id=run_id or secrets.token_hex(4),
            resume="allow",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    @property
    def wandb_dir(self) -> str | None:
        """Directory of the W&B run files (offline runs: upload with ``wandb sync``)."""
        return None if self._wandb_run is None else str(Path(self._wandb_run.dir).parent)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log scalar metrics for optimizer step ``step`` (JSON line + W&B)."""
        if self.rank != 0:
            return
        row = {"iteration": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Log uint8 HWC pictures to W&B and save them as PNG under ``<run_dir>/images``."""
        if self.rank != 0:
            return
        from PIL import Image

        out = self.run_dir / "images"
        out.mkdir(exist_ok=True)
        for name, arr in images.items():
            Image.fromarray(arr).save(out / f"{name}_{step:07d}.png")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set the W&B run summary (the run directory's ``summary.json`` is written by the launcher)."""
        if self._wandb_run is not None:
            for k, v in values.items():
                self._wandb_run.summary[k] = _jsonable(v)

    def close(self) -> None:
        """Flush and close the metrics file and the W&B run."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def truncate_metrics(path: Path, last_iteration: int) -> int:
    """Keep only the rows of ``metrics.jsonl`` with ``iteration <= last_iteration`` (atomic rewrite).

    Returns:
        The number of rows removed.
    """
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a kill: drop it
            removed += 1
            continue
        if int(row.get("iteration", 0)) <= last_iteration:
            kept.append(line)
        else:
            removed += 1
    if removed:
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return removed


#: Loss terms shown on the periodic console lines, with their short names (lr and the rest: metrics.jsonl).
LOSS_LINE_KEYS = {"total": "total", "dino_global_crops_loss": "dino_g", "dino_local_crops_loss": "dino_l",
                  "ibot_loss": "ibot", "koleo_loss": "koleo"}


class TrainProgress:
    """Rank-0 progress bar: count, images/s, elapsed and ETA (fits 80 columns); losses go on their own
    periodic lines above it (:meth:`log_line`), notes too (:meth:`note`). A no-op on other ranks."""

    def __init__(self, total: int, start: int = 0, rank: int = 0, console: Console | None = None):
        self.enabled = rank == 0
        if not self.enabled:
            return
        self.console = console or Console(stderr=True, log_path=False)
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=2,
            expand=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, rate="")
        self.progress.start()

    def update(self, iteration: int, rate: float | None = None) -> None:
        """Move the bar to ``iteration``; ``rate`` in images/s."""
        if self.enabled:
            self.progress.update(self.task, completed=iteration,
                                 rate=f"{rate:.1f} img/s" if rate is not None and math.isfinite(rate) else "")

    def log_line(self, iteration: int, metrics: dict[str, Any]) -> None:
        """Print one line of losses and images/s above the bar (fits 80 columns)."""
        if not self.enabled:
            return
        text = " ".join(f"{short} {metrics[k]:.3f}" for k, short in LOSS_LINE_KEYS.items()
                        if isinstance(metrics.get(k), (int, float)))
        if isinstance(metrics.get("images_per_s"), (int, float)):
            text += f" {metrics['images_per_s']:.0f} img/s"
        self.progress.console.print(f"it {iteration}: {text}", markup=False, highlight=False)

    def note(self, text: str) -> None:
        """Print a status line above the bar."""
        if self.enabled:
            self.progress.console.print(f"[dvtrain] {text}", markup=False, highlight=False)

    def close(self) -> None:
        if self.enabled:
            self.progress.refresh()
            self.progress.stop()
