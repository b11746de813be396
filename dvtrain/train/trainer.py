"""The DINOv2 training loop on top of :class:`dvtrain.train.engine.ShardedTeacherEngine`.

``Trainer.train_step`` reads top to bottom: schedules of the current iteration -> for each
micro-batch: teacher + student forward and backward through the engine -> engine step (per-module
clipping, fp16 loss scaling) -> center update -> teacher EMA -> accounting (skips, non-finite
steps, collapse) -> metrics. "Iteration" counts APPLIED optimizer updates; it indexes the
schedules, so an fp16 overflow-skipped step repeats the same schedule values and does not move the
teacher. Checkpoints go through :class:`dvtrain.checkpoint.manager.Checkpointer` (this trainer is its
``train_state`` part).

Follows ``dinov2/train/train.py::do_train`` (schedules, EMA after the step, periodic checkpoints)
and ``dinov2/train/ssl_meta_arch.py`` (gradient clipping per student sub-module).

The run loop (``dvtrain.train.run``) builds a Trainer from a Recipe and calls :meth:`Trainer.fit`;
:meth:`Trainer.request_stop` (from a signal handler) ends ``fit`` after the step during which every
rank agreed to stop.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dvtrain import dist
from dvtrain.recipe import Recipe, derive, dump_recipe, resolve_ds_config
from dvtrain.checkpoint.manager import Checkpointer
from dvtrain.checkpoint.rng import RNGState
from dvtrain.train.engine import EngineConfig, ShardedTeacherEngine, StepResult
from dvtrain.train.param_groups import apply_schedule_to_param_groups
from dvtrain.train.schedules import Schedules, build_schedules

__all__ = ["Trainer", "TrainingDivergedError", "CollapseMonitor", "schedules_from_recipe", "IMAGE_KEYS"]

log = logging.getLogger(__name__)

#: Batch keys holding images; cast to the compute dtype before the forward.
IMAGE_KEYS = ("collated_global_crops", "collated_local_crops")


class TrainingDivergedError(RuntimeError):
    """Training cannot continue: fp16 loss scale exhausted, too many skipped or non-finite steps."""


class CollapseMonitor:
    """Warn when the DINO loss sits at ln(K) (uniform teacher and student: collapse) for a while.

    Args:
        num_prototypes: K.
        tolerance: |loss - ln K| below this counts as "at ln K" (1e-3).
        patience: consecutive iterations at ln K before warning (warns once per episode).
    """

    def __init__(self, num_prototypes: int, tolerance: float = 1e-3, patience: int = 100) -> None:
        self.target = math.log(num_prototypes)
        self.tolerance = tolerance
        self.patience = patience
        self.count = 0
        self.warned = False

    def update(self, dino_loss: float) -> bool:
        """Feed the iteration's DINO loss (mean cross-entropy over all crop pairs).

        Returns:
            True exactly when the warning fires.
        """
        if math.isfinite(dino_loss) and abs(dino_loss - self.target) < self.tolerance:
            self.count += 1
        else:
            self.count, self.warned = 0, False
        if self.count >= self.patience and not self.warned:
            self.warned = True
            msg = (f"DINO loss {dino_loss:.5f} has been within {self.tolerance} of ln(K) = {self.target:.5f} for "
                   f"{self.count} iterations: teacher and student outputs look uniform (collapse). Check "
                   "teacher temperature / centering, lr and the data")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Counters for checkpoints."""
        return {"count": self.count, "warned": self.warned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.count, self.warned = int(state["count"]), bool(state["warned"])


def schedules_from_recipe(recipe: Recipe, world_size: int = 1) -> Schedules:
    """The per-iteration schedules (lr, wd, teacher momentum and temperature, last-layer lr) of a recipe,
    with the lr scaled for ``world_size`` ranks (``dinov2/train/train.py`` build_schedulers)."""
    d, o, t = derive(recipe, world_size), recipe.optim, recipe.teacher
    return build_schedules(
        lr=d.lr, min_lr=o.min_lr, epochs=recipe.schedule.epochs, warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_start, final_momentum_teacher=t.momentum_end,
        teacher_temp=t.temp, warmup_teacher_temp=t.temp_warmup_start,
        warmup_teacher_temp_epochs=t.temp_warmup_epochs, freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        epoch_length=recipe.schedule.iterations_per_epoch, freeze_backbone_iters=o.freeze_backbone_iterations,
        backbone_warmup_iters=o.freeze_backbone_iterations if o.backbone_warmup_iterations is None
        else o.backbone_warmup_iterations,
    )


def _leaf_module_classes(recipe: Recipe) -> tuple[type, ...]:
    """ZeRO-3 leaf modules: the ViT block (one gather per block), unless activation checkpointing re-runs
    blocks in backward."""
    from dvtrain.models.layers import Block  # noqa: PLC0415

    return () if recipe.model.activation_checkpointing else (Block,)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """DINOv2 trainer: a DeepSpeed (ZeRO) student/teacher engine, schedules, accounting, checkpoints.

    Args:
        recipe: validated :class:`dvtrain.recipe.Recipe`.
        model: optional prebuilt module with the :class:`dvtrain.train.meta_arch.SSLMetaArch`
            interface (``student``/``teacher``, ``forward(batch, teacher_temp) -> dict`` with
            ``total``, ``param_groups(lr_decay_rate, patch_embed_lr_mult)``, ``apply_center_update()``);
            default: ``SSLMetaArch`` built from the recipe with seed ``recipe.seed`` (identical on
            every rank, which ZeRO-3 partitioning requires), by
            :func:`dvtrain.train.build.build_meta_arch` (distillation when ``distill.teacher`` is set).
        apply_init: load ``model.init_from`` into the default model; the launcher passes False when
            the run resumes its own checkpoint (which then provides every weight).

    The process group is created (``dvtrain.dist.init_distributed``) if none exists. After
    construction the training RNGs are seeded with ``recipe.seed + rank``.

    Raises:
        ValueError / RecipeError: invalid recipe combinations (see ``resolve_ds_config`` and
            :class:`dvtrain.train.engine.ShardedTeacherEngine`).
    """

    def __init__(self, recipe: Recipe, model: nn.Module | None = None, apply_init: bool = True) -> None:
        self.recipe = recipe
        self.dist = dist.init_distributed()
        self.derived = derive(recipe, self.dist.world_size)
        _seed_all(recipe.seed)  # same model initialisation on every rank
        if model is None:
            from dvtrain.train.build import build_meta_arch  # noqa: PLC0415

            model = build_meta_arch(recipe, apply_init=apply_init)
        o = recipe.optim
        self.schedules: Schedules = schedules_from_recipe(recipe, self.dist.world_size)
        groups = model.param_groups(o.layerwise_decay, o.patch_embed_lr_mult)
        for g in groups:
            g.pop("names", None)  # names are for logging; keep optimizer state small
        self.engine = ShardedTeacherEngine(
            model, groups, resolve_ds_config(recipe, self.dist.world_size),
            EngineConfig(betas=tuple(o.betas), eps=o.eps, clip_grad=o.clip_grad, clip_mode=o.clip_mode,
                         # ZeRO-3 leaf modules: the backbone runs each block ONCE per forward (packed
                         # multi-crop), so a block is one gather unit (a block called twice would reduce its
                         # gradient twice: assertion in __reduce_and_partition_ipg_grads).
                         leaf_module_classes=_leaf_module_classes(recipe)),
        )
        self.model = self.engine.module
        self.model.train()
        self.device = next(iter(self.engine.teacher_params)).device
        num_prototypes = getattr(getattr(model, "cfg", None), "dino_head_n_prototypes", recipe.loss.num_prototypes)
        self.collapse = CollapseMonitor(num_prototypes)
        self.iteration = 0  # applied optimizer updates == schedule index
        self.consecutive_skips = 0
        self.nonfinite_steps = 0
        self._stop = False
        _seed_all(recipe.seed + self.dist.rank)  # training randomness (drop path) differs per rank

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: Mapping[str, Any] | list[Mapping[str, Any]]) -> dict[str, float]:
        """One optimizer step over ``batch.grad_accum_steps`` micro-batches.

        Args:
            batch: one collated micro-batch (``dvtrain.data.collate.collate_multicrop`` output) when
                ``grad_accum_steps == 1``, else a list of exactly ``grad_accum_steps`` of them.

        Returns:
            Rank-local metrics (floats): the loss terms averaged over micro-batches (``total``,
            ``dino_local_crops_loss``, ...), ``lr``, ``wd``, ``momentum``, ``teacher_temp``,
            ``last_layer_lr``, ``loss_scale``, ``grad_norm`` (nan when skipped), per-module
            ``grad_norm/<module>`` (per_module clipping), ``step_applied`` (1/0),
            ``skipped_steps``, ``iteration`` (applied updates after this step).

        Raises:
            ValueError: wrong number of micro-batches.
            TrainingDivergedError: fp16 overflow at the minimum loss scale, more than
                ``optim.max_consecutive_skipped_steps`` consecutive skips, or
                ``optim.max_nonfinite_losses`` non-finite bf16/fp32 steps. Checkpoints on disk are
                untouched (the last good one stays the latest).
        """
        micro_batches = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if len(micro_batches) != self.recipe.batch.grad_accum_steps:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; batch.grad_accum_steps="
                             f"{self.recipe.batch.grad_accum_steps}")

        # 1. schedules of the current iteration (applied updates so far)
        sched = self.schedules.at(self.iteration)
        apply_schedule_to_param_groups(self.engine.param_groups, sched["lr"], sched["wd"], sched["last_layer_lr"],
                                       sched.get("backbone_lr_scale", 1.0))

        # 2. forward + backward per micro-batch; the engine steps at the accumulation boundary
        loss_sums: dict[str, torch.Tensor] = {}
        result: StepResult | None = None
        for mb in micro_batches:
            losses = self.engine.forward(self._to_device(mb), teacher_temp=sched["teacher_temp"])
            self.engine.backward(losses["total"])
            result = self.engine.step()
            for k, v in losses.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:  # scalar loss terms only
                    loss_sums[k] = loss_sums.get(k, 0.0) + v.detach().float()
        assert result is not None, "the last micro-batch must be an accumulation boundary"

        # 3. centers: fold this step's teacher statistics (collective, every step, applied or not)
        self.model.apply_center_update()

        # 4. teacher EMA and iteration advance only for applied updates
        loss_finite = math.isfinite(float(loss_sums["total"])) if "total" in loss_sums else True
        if result.applied:
            # frozen backbone: its teacher copy is left out of the EMA (bit-identical, m*t + (1-m)*t rounds)
            frozen = ("backbone.",) if sched.get("backbone_lr_scale", 1.0) == 0.0 else ()
            self.engine.update_teacher(sched["momentum"], skip_prefixes=frozen)
            self.iteration += 1
            self.consecutive_skips = 0
        else:
            self._account_skip(result, loss_finite)

        # 5. metrics
        n = len(micro_batches)
        metrics = {k: float(v) / n for k, v in loss_sums.items()}
        metrics.update({k: float(v) for k, v in sched.items()})
        metrics.update(
            loss_scale=result.loss_scale_after, grad_norm=result.grad_norm if result.grad_norm is not None else math.nan,
            step_applied=float(result.applied), skipped_steps=float(self.engine.skipped_steps),
            iteration=float(self.iteration),
        )
        metrics.update({f"grad_norm/{k}": v for k, v in result.module_grad_norms.items()})
        if "dino_global_crops_loss" in metrics:
            dino = metrics["dino_global_crops_loss"] + metrics.get("dino_local_crops_loss", 0.0)
            self.collapse.update(dino)
        return metrics

    def _account_skip(self, result: StepResult, loss_finite: bool = True) -> None:
        """Count a skipped step; raise when the run cannot recover (all ranks agree: DeepSpeed's skip
        decision is global). Under fp16 a skip with a finite loss is a loss-scale overflow; a
        non-finite loss (NaN/inf weights or activations) counts as a non-finite step in any precision."""
        o = self.recipe.optim
        if self.engine.dtype == torch.float16 and loss_finite:
            self.consecutive_skips += 1
            if result.loss_scale_before <= self.engine.min_loss_scale:
                raise TrainingDivergedError(
                    f"fp16 gradients overflowed at the minimum loss scale {self.engine.min_loss_scale:g} "
                    f"(iteration {self.iteration}, {self.consecutive_skips} consecutive skipped steps): the loss "
                    "or activations overflow fp16 even unscaled. Resume from the last checkpoint with "
                    "precision=bf16, a lower optim.base_lr or stronger clipping"
                )
            if self.consecutive_skips >= o.max_consecutive_skipped_steps:
                raise TrainingDivergedError(
                    f"{self.consecutive_skips} consecutive fp16 steps overflowed (optim.max_consecutive_skipped_steps"
                    f"={o.max_consecutive_skipped_steps}; loss scale now {result.loss_scale_after:g}, iteration "
                    f"{self.iteration}). Resume from the last checkpoint with precision=bf16 or a lower lr"
                )
            log.info("fp16 overflow: step skipped, loss scale %g -> %g", result.loss_scale_before,
                     result.loss_scale_after)
        else:
            self.nonfinite_steps += 1
            log.warning("non-finite %s (%s): step skipped (%d of at most %d)",
                        "gradients" if loss_finite else "loss", self.engine.dtype, self.nonfinite_steps,
                        o.max_nonfinite_losses)
            if self.nonfinite_steps >= o.max_nonfinite_losses:
                raise TrainingDivergedError(
                    f"{self.nonfinite_steps} steps had a non-finite loss or gradient in {self.recipe.precision} "
                    f"(optim.max_nonfinite_losses={o.max_nonfinite_losses}; iteration {self.iteration}). The "
                    "last good checkpoint is kept; resume from it with a lower lr or check the data"
                )

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if k in IMAGE_KEYS:
                    v = v.to(self.engine.dtype)
            out[k] = v
        return out

    # ------------------------------------------------------------------ loop
    def request_stop(self) -> None:
        """Ask :meth:`fit` to return after the current step (e.g. from a signal handler). Only this
        rank's request: :meth:`fit` agrees across ranks, so every rank stops after the same step."""
        self._stop = True

    @property
    def total_iterations(self) -> int:
        """Planned applied optimizer steps of the run."""
        return self.derived.total_iterations

    def _agree_stop(self, stop_requested: Callable[[], bool] | None = None) -> bool:
        """True when any rank asked to stop (an all-reduce MAX with several ranks, so all ranks
        leave the loop after the same step)."""
        if stop_requested is not None and stop_requested():
            self._stop = True
        if self.dist.world_size == 1:
            return self._stop
        flag = torch.tensor([1 if self._stop else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._stop = bool(flag.item())
        return self._stop

    def fit(
        self,
        data: Iterable[Mapping[str, Any]],
        on_step: Callable[[dict[str, float]], None] | None = None,
        checkpointer: Checkpointer | None = None,
        parts: Mapping[str, Any] | None = None,
        max_iterations: int | None = None,
        stop_requested: Callable[[], bool] | None = None,
    ) -> str:
        """Train until ``max_iterations`` (default: the recipe's length), the data ends, or a stop request.

        Every ``checkpoint.every`` applied iterations, and when the loop ends (done or stopped), the
        run state is saved through ``checkpointer``: the engine, this trainer's state and ``parts``
        (the data loader, the run identity; RNG states are added here).

        Args:
            data: iterator of collated micro-batches (``grad_accum_steps`` are consumed per step).
            on_step: called with each step's metrics (after accounting, before the stop agreement
                and checkpointing).
            checkpointer: where the state goes; None = no checkpoints.
            parts: extra stateful parts (``data``, ``run``) saved with every checkpoint.
            max_iterations: stop when ``iteration`` reaches this.
            stop_requested: polled after every step (e.g. a signal flag); when it returns True on
                any rank (or :meth:`request_stop` was called), every rank stops after this step.

        Returns:
            ``"done"``, ``"data_exhausted"`` or ``"stopped"``.

        Raises:
            TrainingDivergedError: see :meth:`train_step`; checkpoints on disk stay as they were.
        """
        target = self.total_iterations if max_iterations is None else max_iterations
        it: Iterator = iter(data)
        gas = self.recipe.batch.grad_accum_steps
        every = self.recipe.checkpoint.every
        reason = "done"
        last_saved = self.iteration
        while self.iteration < target:
            try:
                mbs = [next(it) for _ in range(gas)]
            except StopIteration:
                reason = "data_exhausted"
                break
            metrics = self.train_step(mbs if gas > 1 else mbs[0])
            if on_step is not None:
                on_step(metrics)
            stopping = self._agree_stop(stop_requested)
            if checkpointer is not None and metrics["step_applied"] and self.iteration % every == 0:
                self.save_checkpoint(checkpointer, parts)
                last_saved = self.iteration
            if stopping:
                reason = "stopped"
                break
        if checkpointer is not None and self.iteration != last_saved:
            self.save_checkpoint(checkpointer, parts)
        return reason

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict[str, Any]:
        """The train state (``dvtrain.checkpoint.layout.TRAIN_STATE_KEYS``): iteration, skip and
        non-finite counters, world size, global batch and peak lr (checked on resume), the collapse
        monitor and the persistent module buffers (DINO/iBOT centers) as CPU tensors. Reads buffers
        directly, no ``module.state_dict()`` (that would gather ZeRO-3 parameters on one rank)."""
        buffers = {}
        for mod_name, mod in self.model.named_modules():
            for name, buf in mod._buffers.items():
                if buf is not None and name not in mod._non_persistent_buffers_set:
                    buffers[f"{mod_name}.{name}" if mod_name else name] = buf.detach().cpu().clone()
        return {
            "iteration": self.iteration, "consecutive_skips": self.consecutive_skips,
            "nonfinite_steps": self.nonfinite_steps, "world_size": self.dist.world_size,
            "global_batch": self.derived.global_batch, "lr": self.derived.lr,
            "collapse": self.collapse.state_dict(), "buffers": buffers,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`check_resumable`)."""
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for k, v in state["buffers"].items():
                if k in buffers:
                    buffers[k].copy_(v.to(buffers[k].device, buffers[k].dtype))
        self.iteration = int(state["iteration"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.collapse.load_state_dict(state["collapse"])

    def check_resumable(self, state: Mapping[str, Any]) -> None:
        """Refuse a train state written by another number of ranks; warn when the global batch changed.

        Raises:
            ValueError: naming both rank counts (ZeRO shards are per rank; resharding is not supported).
        """
        if state["world_size"] != self.dist.world_size:
            raise ValueError(
                f"the checkpoint was written by {state['world_size']} rank(s) but this run has "
                f"{self.dist.world_size}: resuming on a different number of processes is not supported (ZeRO "
                f"shards are per rank). Relaunch with {state['world_size']} processes"
            )
        if state["global_batch"] != self.derived.global_batch:
            msg = (f"global batch changed on resume: {state['global_batch']} -> {self.derived.global_batch} images; "
                   f"peak lr ({self.recipe.optim.lr_scaling} scaling) changes {state['lr']:.6g} -> "
                   f"{self.derived.lr:.6g} from iteration {state['iteration']} on")
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)

    def checkpointer(self, root: str | Path) -> Checkpointer:
        """A :class:`Checkpointer` over ``root`` for this run (ranks, retention, collectives)."""
        return Checkpointer(root, rank=self.dist.rank, world_size=self.dist.world_size,
                            keep_last=self.recipe.checkpoint.keep_last, barrier=dist.barrier, all_ok=self._all_ok)

    def _parts(self, parts: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"train_state": self, "rng": RNGState(), **dict(parts or {})}

    def _as_checkpointer(self, where: str | Path | Checkpointer) -> Checkpointer:
        return where if isinstance(where, Checkpointer) else self.checkpointer(where)

    def save_checkpoint(self, checkpointer: str | Path | Checkpointer, parts: Mapping[str, Any] | None = None) -> Path:
        """Atomically write the checkpoint of the current iteration (collective: every rank calls it).

        Args:
            checkpointer: a :class:`Checkpointer`, or a checkpoint root directory.
            parts: extra stateful parts by name (``data``, ``run``).

        Contents (:mod:`dvtrain.checkpoint.layout`): the engine (DeepSpeed checkpoint + teacher fp32
        shards), the train state (:meth:`state_dict`), every rank's RNG states, ``parts`` (e.g. the
        data loader position, the run identity) and the resolved recipe.

        Returns:
            Path of the checkpoint directory.
        """
        return self._as_checkpointer(checkpointer).save(self.iteration, self.engine, self._parts(parts),
                                                        dump_recipe(self.recipe))

    def _all_ok(self, ok: bool) -> bool:
        if self.dist.world_size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def load_checkpoint(self, checkpointer: str | Path | Checkpointer, path: str | Path | None = None,
                        parts: Mapping[str, Any] | None = None) -> Path:
        """Restore a checkpoint written by :meth:`save_checkpoint` (collective, before the first step).

        Args:
            checkpointer: the run's checkpointer, or a checkpoint root / directory. path: a checkpoint
                directory or root (default: the checkpointer's root; its newest complete checkpoint is used).
            parts: the same extra parts as given to :meth:`fit`; each is restored in place.

        Returns:
            The checkpoint directory restored.

        Raises:
            ValueError: no complete checkpoint; written by a different number of ranks (both counts
                named); missing files.
        """
        checkpointer = self._as_checkpointer(checkpointer)
        return checkpointer.load(path or checkpointer.root, self.engine, self._parts(parts),
                                 check=self.check_resumable)

    # ------------------------------------------------------------------ export
    def export_teacher_backbone(self) -> dict[str, torch.Tensor]:
        """The teacher backbone as a full-shape fp32 CPU state dict (``blocks.N.*`` keys), on EVERY rank.

        Collective: every rank must call it (ZeRO-3 shards are all-gathered).
        """
        return self.engine.gather_fp32_state_dict("teacher", "backbone.")

    def export_student_backbone(self) -> dict[str, torch.Tensor]:
        """The student backbone (optimizer fp32 masters) like :meth:`export_teacher_backbone`."""
        return self.engine.gather_fp32_state_dict("student", "backbone.")
