"""One rank's training run: build, resume, train, export, summarise. Every rank calls :func:`run_worker`.

Order of a run (the console shows each phase on rank 0):
1. model and DeepSpeed engine (:class:`dvtrain.train.trainer.Trainer`), then the data loader;
2. resume: crash leftovers of an interrupted save are finished or cleared, then the newest complete
   checkpoint restores every part of the run state (engine, train state, RNG, data position, run
   identity) - see :mod:`dvtrain.checkpoint`;
3. the metrics sink (``metrics.jsonl`` cut back to the iteration training starts from - rows a killed
   launch logged after its last checkpoint are replayed - and W&B continuing the same run id);
4. :meth:`Trainer.fit` with the progress bar, periodic loss lines and checkpoints;
5. teacher export, pictures, k-NN (when the run is done), ``summary.json``, a closing summary block.

Outcome (``summary["status"]``): ``done``; ``stopped`` (a signal: the step finished and a checkpoint
was written); ``data_exhausted``; ``diverged`` (:class:`dvtrain.train.trainer.TrainingDivergedError`);
``failed`` (any other error; its traceback goes to ``<run_dir>/error.log``). ``summary.json`` is
written in every case.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from dvtrain import dist
from dvtrain.checkpoint.atomic import find_latest_checkpoint, write_json_atomic
from dvtrain.checkpoint.layout import CHECKPOINTS_DIR
from dvtrain.checkpoint.rng import RNGState
from dvtrain.faults import maybe_signal_self
from dvtrain.recipe import Recipe, dump_recipe, resolve_ds_config

__all__ = ["run_worker", "RunIdentity", "checkpoint_root", "STATUS_EXIT_CODES"]

log = logging.getLogger(__name__)

#: Exit status of ``dvtrain launch`` per run status; a stop is 128 + the signal number (130 SIGINT, 143 SIGTERM).
STATUS_EXIT_CODES = {"done": 0, "data_exhausted": 0, "diverged": 1, "failed": 1}


def checkpoint_root(recipe: Recipe, run_dir: Path) -> Path:
    """Where a run's checkpoints live: ``checkpoint.dir`` or ``<run_dir>/checkpoints``."""
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else Path(run_dir) / CHECKPOINTS_DIR


class RunIdentity:
    """The metrics/W&B identity of a run, saved in every checkpoint: a resumed run logs into the same
    W&B run (``wandb_run_id``) and knows when it first started."""

    def __init__(self, wandb_run_id: str | None = None) -> None:
        self.wandb_run_id = wandb_run_id or secrets.token_hex(4)
        self.started_at = time.time()

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.wandb_run_id, "started_at": self.started_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wandb_run_id = str(state["wandb_run_id"])
        self.started_at = float(state["started_at"])


class _Console:
    """Rank-0 status lines on stderr (``[dvtrain] ...``); silent on other ranks."""

    def __init__(self, rank: int) -> None:
        from rich.console import Console

        self.enabled = rank == 0
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def status(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[dvtrain] {text}", markup=False)


def _quiet_deepspeed(verbose: bool) -> None:
    """DeepSpeed's INFO lines only with ``--verbose``."""
    level = logging.INFO if verbose else logging.WARNING
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(level)
        for h in ds_logger.handlers:
            h.setLevel(level)
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass


def run_worker(recipe: Recipe, run_dir: Path, resume: bool, stop: Any = None, verbose: bool = False) -> dict:
    """Train one rank of the run described by ``recipe`` in ``run_dir`` (every rank calls this).

    Args:
        recipe: the validated recipe. run_dir: the run directory.
        resume: restore the newest complete checkpoint when there is one.
        stop: an object with ``requested: bool`` and ``signum`` (``dvtrain.launch.StopRequest``),
            polled after every step; None = no signal handling.
        verbose: show DeepSpeed's INFO lines.

    Writes (rank 0): ``recipe.yaml``, ``ds_config.json``, ``metrics.jsonl``, W&B files, checkpoints,
    ``export/teacher_backbone.pth`` (+ ``.json``), ``summary.json``; ``error.log`` on failure.

    Returns:
        The summary (same on every rank); ``status`` is one of done, stopped, data_exhausted,
        diverged, failed (see the module docstring), ``signal`` the stopping signal's number.
    """
    from dvtrain.data.loader import build_train_loader
    from dvtrain.flops import peak_flops
    from dvtrain.logging import RunLogger, TrainProgress
    from dvtrain.train.metrics import RunMeter, flops_per_image
    from dvtrain.train.trainer import Trainer, TrainingDivergedError

    # torch 2.14 deprecates the collective names DeepSpeed 0.19 calls every step; keep the log readable.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    _quiet_deepspeed(verbose)
    t_start = time.time()
    info = dist.init_distributed()
    con = _Console(info.rank)
    run_dir = Path(run_dir)
    m = recipe.model
    con.status(f"run {run_dir}: recipe {recipe.name}, {info.world_size} rank(s), {recipe.precision}, ZeRO stage "
               f"{recipe.zero.stage}")
    con.status(f"building the model ({m.arch}, patch {m.patch_size}, {m.num_register_tokens} registers, "
               f"{m.ffn_layer}) and the DeepSpeed engine")
    ckpt_root = checkpoint_root(recipe, run_dir)
    resuming = resume and find_latest_checkpoint(ckpt_root) is not None
    trainer = Trainer(recipe, apply_init=not resuming)  # a resumed run never re-reads model.init_from
    d = trainer.derived
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.engine.student_params)
    con.status(f"engine ready: student {n_params / 1e6:.2f} M parameters, global batch {d.global_batch}, "
               f"{d.total_iterations} iterations")
    checkpointer = trainer.checkpointer(ckpt_root)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        write_json_atomic(run_dir / "ds_config.json", resolve_ds_config(recipe, info.world_size))
    con.status(f"opening the data: {recipe.data.path} ({recipe.data.num_workers} loader worker(s) per rank)")
    loader = build_train_loader(recipe)
    con.status(f"data: {loader.epoch_size} images per epoch, {len(loader)} batches of "
               f"{recipe.batch.micro_batch_per_device} per rank")
    identity = RunIdentity()
    parts = {"data": loader, "run": identity}

    for action in checkpointer.recover():
        con.status(f"checkpoints: {action}")
    resumed_from = None
    # Restore last: everything above must not depend on (or move) the restored RNG states.
    if resume and checkpointer.latest() is not None:
        resumed_from = trainer.load_checkpoint(checkpointer, parts=parts)
        pos = loader.state_dict()
        con.status(f"resuming from {_rel(resumed_from, run_dir)} (iteration {trainer.iteration}, epoch {pos['epoch']}, "
                   f"sample {pos['sample_in_epoch']})")
    start_iteration = trainer.iteration

    saved_rng = RNGState().state_dict()  # W&B start-up must not move the restored RNG states
    logger = RunLogger(run_dir, recipe, rank=info.rank, run_id=identity.wandb_run_id,
                       resume_iteration=start_iteration,
                       extra_config={"world_size": info.world_size, **d.model_dump()})
    RNGState().load_state_dict(saved_rng)
    meter = RunMeter(recipe.batch.micro_batch_per_device * recipe.batch.grad_accum_steps, info.world_size,
                     flops_per_image(recipe, trainer.model), peak_flops(trainer.device, recipe.precision),
                     trainer.device)
    if recipe.precision == "fp16":
        con.status("fp16: the first steps may be skipped while the dynamic loss scale settles (gradients that "
                   "overflow fp16 halve the scale and skip the step)")
    progress = TrainProgress(d.total_iterations, start=start_iteration, rank=info.rank, console=con.console)
    last: dict[str, float] = {}
    first_batch: dict = {}
    skipped_in_a_row = {"n": 0}

    def on_step(metrics: dict[str, float]) -> None:
        meter.step()
        last.update(metrics)
        it = trainer.iteration
        maybe_signal_self(it, info.rank)  # crash tests only (DVTRAIN_FAULT)
        if not metrics["step_applied"]:
            skipped_in_a_row["n"] += 1
            if skipped_in_a_row["n"] == 1 and trainer.engine.dtype == torch.float16 and math.isfinite(metrics["total"]):
                progress.note(f"fp16: step skipped at iteration {it}: gradients overflowed at loss scale "
                              f"{metrics['loss_scale'] * 2:g}; halving the scale until they fit")
            progress.update(it, rate=meter.images_per_s())
            return
        if skipped_in_a_row["n"]:
            progress.note(f"fp16: loss scale settled at {metrics['loss_scale']:g} after {skipped_in_a_row['n']} "
                          f"skipped step(s); iteration {it}")
            skipped_in_a_row["n"] = 0
        if it % recipe.wandb.log_every == 0 or it == d.total_iterations:
            row = dict(metrics)
            row.update(meter.window())
            row["images_seen"] = it * d.global_batch
            logger.log(it, row)
            progress.log_line(it, row)
        progress.update(it, rate=meter.images_per_s())
        if recipe.wandb.image_every and it % recipe.wandb.image_every == 0:
            _log_pictures(trainer, recipe, logger, it, first_batch)

    def batches():
        while True:  # endless: the loader continues with the next epoch
            got = False
            for b in loader:
                got = True
                if not first_batch:
                    first_batch.update(b)
                yield b
            if not got:
                return

    t_fit = time.time()
    status, reason, knn = "done", "", None
    try:
        status = trainer.fit(meter.timed(batches()), on_step=on_step, checkpointer=checkpointer, parts=parts,
                             stop_requested=(lambda: stop.requested) if stop is not None else None)
    except TrainingDivergedError as exc:
        status, reason = "diverged", str(exc)
    except Exception as exc:  # noqa: BLE001 - reported once, traceback to error.log, summary written
        status, reason = "failed", f"{type(exc).__name__}: {exc}"
        if info.rank == 0:
            (run_dir / "error.log").write_text(traceback.format_exc())
    finally:
        progress.close()
    fit_s = time.time() - t_fit
    export_path = run_dir / "export" / "teacher_backbone.pth"
    if status in ("done", "stopped", "data_exhausted"):
        teacher_sd = trainer.export_teacher_backbone()
        if status == "done":
            _log_pictures(trainer, recipe, logger, trainer.iteration, first_batch, teacher_sd)
            if recipe.eval.train_path and recipe.eval.val_path:
                con.status("k-NN evaluation of the teacher")
                knn = teacher_knn(recipe, teacher_sd)
                k0 = str(recipe.eval.ks[0])
                logger.log(trainer.iteration, {"knn_top1": knn["per_k"][k0]["top1"],
                                               "knn_top5": knn["per_k"][k0]["top5"]})
        if info.rank == 0:
            _export_teacher(recipe, teacher_sd, export_path)
    latest = checkpointer.latest()
    summary = {
        "status": status,
        "reason": reason,
        "signal": getattr(stop, "signum", None) if status == "stopped" else None,
        "iterations": trainer.iteration,
        "total_iterations": d.total_iterations,
        "resumed_from_iteration": start_iteration if resumed_from is not None else None,
        "images_seen": trainer.iteration * d.global_batch,
        "world_size": info.world_size,
        "wall_time_s": time.time() - t_start,
        "train_time_s": fit_s,
        "images_per_s": (trainer.iteration - start_iteration) * d.global_batch / max(fit_s, 1e-9),
        "final_losses": {k: v for k, v in last.items() if k.endswith("_loss") or k == "total"},
        "skipped_steps": int(last.get("skipped_steps", 0)),
        "bad_samples": int(getattr(loader, "num_bad_samples", 0)),
        "last_checkpoint": str(latest) if latest else None,
        "teacher_export": str(export_path) if export_path.is_file() else None,
        "checkpoints": str(ckpt_root),
        "metrics": str(run_dir / "metrics.jsonl"),
        "wandb_dir": logger.wandb_dir,
        "wandb_run_id": identity.wandb_run_id,
        "knn": knn,
    }
    if info.rank == 0:
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        write_json_atomic(run_dir / "summary.json", summary)
    logger.close()
    if info.rank == 0:
        _print_summary(con, summary, run_dir)
    if status in ("done", "stopped", "data_exhausted"):
        dist.barrier()
    return summary


def _rel(path: Path | str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def _print_summary(con: _Console, s: dict, run_dir: Path) -> None:
    """The closing block: status, iterations, images/s, where everything is."""
    words = {"done": "done", "stopped": "stopped", "data_exhausted": "stopped (the data ran out)",
             "diverged": "DIVERGED", "failed": "FAILED"}
    con.status(f"{words[s['status']]}: iteration {s['iterations']} of {s['total_iterations']}, "
               f"{s['images_per_s']:.1f} images/s, {s['wall_time_s']:.0f} s")
    if s["reason"]:
        con.status(f"reason: {s['reason']}")
        if s["status"] == "failed" and (run_dir / "error.log").is_file():
            con.status(f"traceback: {run_dir / 'error.log'}")
    rows = [("last checkpoint", s["last_checkpoint"]), ("teacher export", s["teacher_export"]),
            ("metrics", s["metrics"]), ("summary", str(run_dir / "summary.json")), ("W&B files", s["wandb_dir"])]
    if s["knn"]:
        k0 = next(iter(s["knn"]["per_k"]))
        rows.insert(0, (f"teacher k-NN top-1 (k={k0})", f"{s['knn']['per_k'][k0]['top1']:.2f} %"))
    for name, value in rows:
        if value:
            con.status(f"  {name:<18} {value}")
    if s["status"] == "stopped":
        con.status("  relaunch the same command to resume exactly from the last checkpoint")
    elif s["status"] in ("diverged", "failed") and s["last_checkpoint"]:
        con.status(f"  the last good checkpoint is kept: {s['last_checkpoint']}")


def _export_teacher(recipe: Recipe, teacher_sd: dict, out: Path) -> None:
    from dvtrain.checkpoint.backbone import LoadedBackbone, backbone_from_recipe, backbone_kwargs
    from dvtrain.export import export_hub

    model = backbone_from_recipe(recipe, teacher_sd)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_hub(LoadedBackbone(model, backbone_kwargs(model), "training", "teacher", {"recipe": recipe.name}), out,
               overwrite=True)


def teacher_knn(recipe: Recipe, teacher_sd: dict) -> dict:
    """k-NN (DINOv2 protocol) of the teacher backbone on ``eval.train_path`` / ``eval.val_path``."""
    from dvtrain.checkpoint.backbone import backbone_from_recipe
    from dvtrain.eval.features import make_eval_loader
    from dvtrain.eval.knn import knn_eval_backbone

    e = recipe.eval
    size = e.image_size or recipe.crops.global_size
    model = backbone_from_recipe(recipe, teacher_sd)
    train = make_eval_loader(e.train_path, batch_size=256, crop_size=size, resize_size=size, limit=e.bank_size)
    val = make_eval_loader(e.val_path, batch_size=256, crop_size=size, resize_size=size)
    autocast = torch.bfloat16 if recipe.precision == "bf16" else None
    return knn_eval_backbone(model, train, val, ks=e.ks, temperature=e.temperature, autocast_dtype=autocast)


def _log_pictures(trainer, recipe: Recipe, logger, it: int, batch: dict, teacher_sd: dict | None = None) -> None:
    """Crop grid of the first batch and the PCA picture of the teacher's patch features (collective).
    Runs under a forked torch RNG: the pictures never move the training randomness."""
    import numpy as np

    if teacher_sd is None:
        teacher_sd = trainer.export_teacher_backbone()
    if logger.rank != 0 or not batch:
        return
    from PIL import Image

    from dvtrain.checkpoint.backbone import backbone_from_recipe
    from dvtrain.data.augment import crop_grid, denormalise
    from dvtrain.viz import pca_figure

    with torch.random.fork_rng(devices=[]):
        grid = crop_grid(batch)
        model = backbone_from_recipe(recipe, teacher_sd)
        b = batch["collated_global_crops"].shape[0] // 2
        images = [Image.fromarray(denormalise(batch["collated_global_crops"][i])) for i in range(min(4, b))]
        fig, _ = pca_figure(model, images, image_size=recipe.crops.global_size * 4)
    logger.log_images(it, {"crops": grid, "teacher_pca": np.asarray(fig.convert("RGB"))})
