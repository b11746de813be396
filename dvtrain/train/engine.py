"""DeepSpeed engine for the student/teacher pair: ZeRO sharding, sharded fp32 EMA teacher, loss-scale
accounting, per-module gradient clipping, checkpoint save/load and consolidated fp32 export.

The DeepSpeed engine specifics of dvtrain (initialisation, ZeRO partitions, loss scaler, checkpoint
calls) live in this module; the other places that know DeepSpeed are the launcher
(``dvtrain.launch``: the ``deepspeed`` runner) and the ds_config resolution (``dvtrain.recipe``).

Design
------
ONE DeepSpeed engine wraps the whole meta-architecture (a module with ``student`` and ``teacher``
sub-modules of identical structure, e.g. :class:`dvtrain.train.meta_arch.SSLMetaArch`). ZeRO-3
therefore partitions teacher and student the same way by construction: parameter ``i`` of the
teacher and parameter ``i`` of the student have the same partition bounds on every rank. The
optimizer sees only the student's parameter groups; teacher parameters are frozen
(``requires_grad=False``), partitioned, and gathered by ZeRO-3's hooks when the teacher runs.

Teacher EMA (``dinov2/train/ssl_meta_arch.py::update_teacher``, ``teacher = m teacher + (1-m) student``)
runs on the local shards, without collectives, on fp32:

- ZeRO-3: the student side is the optimizer's fp32 master partition
  (``deepspeed.utils.safe_get_local_fp32_param``, a [partition] view), the teacher side an fp32
  master of the same shape owned by this engine (in fp32 runs: the teacher's ``ds_tensor`` itself).
  The result is copied into the teacher's ``ds_tensor`` (compute dtype). 1 - m drops below bf16
  and fp16 resolution late in training (0.999: 1000 updates from 1 towards 0 give 0.367695 in
  fp32, 1.0 in bf16), hence the fp32 master.
- Parameters ZeRO-3 keeps whole (``ds_persist``: numel <= ``stage3_param_persistence_threshold``)
  are never re-gathered from ``ds_tensor`` by DeepSpeed, so after the EMA their resident full copy
  would be stale. The EMA releases every resident teacher parameter (a local free, no collective);
  the next teacher forward gathers it from the updated shards.
- ZeRO 0/1/2: parameters are replicated; the fp32 master of the teacher is a full copy on every
  rank, the student side the full fp32 master (the parameter itself in fp32 runs, else
  ``deepspeed.utils.safe_get_full_fp32_param``, which all-reduces per parameter in ZeRO-1/2).

Checkpoints (file names: :mod:`dvtrain.checkpoint.layout`): ``engine.save_checkpoint`` under ``ds/``
(student fp32 masters, optimizer state, loss scaler, module buffers) plus one ``teacher_rank<r>.pt``
per rank with that rank's fp32 teacher masters; :class:`dvtrain.checkpoint.manager.Checkpointer`
calls :meth:`ShardedTeacherEngine.save` / ``load`` as its engine part. The
teacher never goes through a second engine's ``save_checkpoint`` (that failed or hung on 2 ranks).

Shape legend: P = elements of one rank's partition of a parameter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from dvtrain.checkpoint import layout
from dvtrain.checkpoint.partition import join_partitions
from dvtrain.recipe import per_module_clipping_problem

__all__ = [
    "EngineConfig",
    "StepResult",
    "ShardedTeacherEngine",
    "ema_update_",
]

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine settings not carried by the DeepSpeed config.

    Attributes:
        betas: AdamW betas (0.9, 0.999).
        eps: AdamW epsilon.
        clip_grad: max gradient norm; 0 = no clipping.
        clip_mode: ``"global"`` (one norm over the student; DeepSpeed's ``gradient_clipping`` must
            be set to ``clip_grad`` in the config) or ``"per_module"`` (the reference: each
            child of ``model.student`` clipped to ``clip_grad`` on its own; DeepSpeed's clipping must be 0).
        leaf_module_classes: module classes ZeRO-3 gathers as one unit (e.g. the ViT ``Block``), so
            it does not gather parameter by parameter inside a block.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0
    clip_mode: str = "global"
    leaf_module_classes: Sequence[type] = field(default_factory=tuple)


@dataclass(frozen=True)
class StepResult:
    """Outcome of one optimizer step (the last micro-batch of an accumulation window).

    Attributes:
        applied: the optimizer update happened (False: skipped for fp16 overflow or a non-finite
            gradient norm; the same on every rank).
        loss_scale_before: loss scale the gradients of this step were computed with (1.0 unless fp16).
        loss_scale_after: loss scale for the next step.
        grad_norm: global L2 norm of the unscaled student gradients before clipping (None when
            DeepSpeed did not compute it, e.g. skipped steps).
        module_grad_norms: per-module norms before clipping (per_module mode), else empty.
    """

    applied: bool
    loss_scale_before: float
    loss_scale_after: float
    grad_norm: float | None
    module_grad_norms: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def ema_update_(
    teacher_fp32: Sequence[torch.Tensor],
    student_fp32: Sequence[torch.Tensor],
    momentum: float,
    names: Sequence[str] | None = None,
) -> None:
    """In place ``t = m * t + (1 - m) * s`` over lists of tensors (``torch._foreach``).

    Same arithmetic as ``dinov2/train/ssl_meta_arch.py::update_teacher``.

    Args:
        teacher_fp32: teacher master tensors, fp32 (any shape), updated in place.
        student_fp32: student tensors of the same numel, fp32.
        momentum: m in [0, 1].
        names: parameter names for error messages.

    Raises:
        ValueError: momentum outside [0, 1]; a teacher master that is not fp32 (a bf16/fp16 master
            stalls: 1 - m is below its resolution late in training); mismatched list lengths or numel.
        RuntimeError: a 0-element tensor, i.e. a ZeRO-3 parameter's placeholder ``param.data``
            outside a gather; an EMA over it would silently update nothing.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
    if len(teacher_fp32) != len(student_fp32):
        raise ValueError(f"EMA over {len(teacher_fp32)} teacher and {len(student_fp32)} student tensors")
    names = list(names) if names is not None else [f"#{i}" for i in range(len(teacher_fp32))]
    for name, t, s in zip(names, teacher_fp32, student_fp32):
        if t.numel() == 0 or s.numel() == 0:
            raise RuntimeError(
                f"EMA over a 0-element tensor for parameter {name} (teacher {tuple(t.shape)}, student "
                f"{tuple(s.shape)}): this is a ZeRO-3 placeholder outside a gather; update the local "
                "partition (ds_tensor / fp32 master) instead"
            )
        if t.dtype != torch.float32 or s.dtype != torch.float32:
            raise ValueError(
                f"EMA of {name} needs fp32 teacher master and student (got {t.dtype}, {s.dtype}): "
                "1 - momentum is below bf16/fp16 resolution late in training"
            )
        if t.numel() != s.numel():
            raise ValueError(f"EMA of {name}: teacher has {t.numel()} elements, student {s.numel()}")
    if not teacher_fp32:
        return
    torch._foreach_mul_(list(teacher_fp32), momentum)
    torch._foreach_add_(list(teacher_fp32), [s.view(t.shape) for t, s in zip(teacher_fp32, student_fp32)],
                        alpha=1.0 - momentum)


def _dtype_of(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    return torch.float32


class ShardedTeacherEngine:
    """A DeepSpeed engine over a student/teacher module, with the teacher EMA on local fp32 shards.

    Args:
        model: module with ``student`` and ``teacher`` sub-modules whose ``named_parameters()``
            agree in names and shapes; teacher parameters must have ``requires_grad=False``. Its
            ``forward`` is what :meth:`forward` runs (e.g. ``SSLMetaArch.forward(batch, teacher_temp)``).
        param_groups: optimizer groups over the student's trainable parameters only (dicts with
            ``params`` and any extra keys, e.g. from ``dvtrain.train.param_groups.build_param_groups``).
        ds_config: resolved DeepSpeed config (``dvtrain.recipe.resolve_ds_config``); must not contain
            ``optimizer`` or ``scheduler``.
        config: :class:`EngineConfig`.

    Raises:
        ValueError: student/teacher structures differ; a teacher parameter is trainable; the
            optimizer groups contain a teacher parameter or miss a trainable student parameter;
            per-module clipping with a configuration that cannot support it (ZeRO-1/2, offload,
            DeepSpeed clipping also on).
    """

    def __init__(
        self, model: nn.Module, param_groups: list[dict[str, Any]], ds_config: dict[str, Any],
        config: EngineConfig | None = None,
    ) -> None:
        import deepspeed  # noqa: PLC0415 - heavy import

        self.config = config or EngineConfig()
        self.ds_config = ds_config
        self.dtype = _dtype_of(ds_config)
        zero = ds_config.get("zero_optimization", {})
        self.zero_stage = int(zero.get("stage", 0))
        self.offload = bool(zero.get("offload_optimizer")) and zero["offload_optimizer"].get("device", "none") != "none"
        self._validate(model, param_groups, ds_config)

        if self.config.leaf_module_classes and self.zero_stage == 3:
            classes = list(self.config.leaf_module_classes)
            present = {type(m) for m in model.modules()}
            classes = [c for c in classes if c in present]
            if classes:
                deepspeed.utils.set_z3_leaf_modules(model, classes)

        opt_kwargs = dict(lr=0.0, betas=tuple(self.config.betas), eps=self.config.eps, weight_decay=0.0)
        if self.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415

            optimizer = DeepSpeedCPUAdam(param_groups, adamw_mode=True, **opt_kwargs)
        else:
            # fused: one kernel over all tensors of a group (CPU and CUDA); ~5x faster than torch's CPU
            # default for-loop on ZeRO-3's flat partitions (benchmarks/results/2026-12-01-step-profile-cpu.md)
            optimizer = torch.optim.AdamW(param_groups, fused=True, **opt_kwargs)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        self._ds_opt = self.engine.optimizer  # ZeRO optimizer wrapper (or the base optimizer at stage 0)

        scaler = getattr(self._ds_opt, "loss_scaler", None)
        if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
            # The trainer raises its own, explicit error at the minimum scale (see dvtrain.train.trainer).
            scaler.raise_error_at_min_scale = False

        self.student_names, self.student_params = zip(*self.module.student.named_parameters())
        self.teacher_names, self.teacher_params = zip(*self.module.teacher.named_parameters())
        self._teacher_master: list[torch.Tensor | None] = self._init_teacher_master()

        self._clip_index: dict[int, int] = {}
        self.clip_module_names: list[str] = []
        if self.config.clip_mode == "per_module" and self.config.clip_grad > 0:
            names = [n for n, _ in self.module.student.named_children()]
            self.clip_module_names = names
            for idx, name in enumerate(names):
                for p in self.module.student[name].parameters():
                    self._clip_index[id(p)] = idx

    # ------------------------------------------------------------------ construction helpers
    def _validate(self, model: nn.Module, param_groups: list[dict[str, Any]], ds_config: dict[str, Any]) -> None:
        for key in ("optimizer", "scheduler"):
            if key in ds_config:
                raise ValueError(f"DeepSpeed config sets '{key}': dvtrain builds AdamW and applies its own "
                                 "schedules; remove the key")
        if not hasattr(model, "student") or not hasattr(model, "teacher"):
            raise ValueError("the model must have 'student' and 'teacher' sub-modules (e.g. SSLMetaArch)")
        s = [(n, tuple(p.shape)) for n, p in model.student.named_parameters()]
        t = [(n, tuple(p.shape)) for n, p in model.teacher.named_parameters()]
        if s != t:
            diff = sorted(set(s) ^ set(t))[:5]
            raise ValueError(f"student and teacher parameters differ (first differences: {diff})")
        trainable_teacher = [n for n, p in model.teacher.named_parameters() if p.requires_grad]
        if trainable_teacher:
            raise ValueError(f"teacher parameters must have requires_grad=False, got {trainable_teacher[:5]}")
        in_groups = {id(p) for g in param_groups for p in g["params"]}
        teacher_ids = {id(p) for p in model.teacher.parameters()}
        if in_groups & teacher_ids:
            raise ValueError("the optimizer groups contain teacher parameters; pass student groups only")
        missing = [n for n, p in model.student.named_parameters() if p.requires_grad and id(p) not in in_groups]
        if missing:
            raise ValueError(f"trainable student parameters missing from the optimizer groups: {missing[:5]}")
        cfg = self.config
        if cfg.clip_mode not in ("global", "per_module"):
            raise ValueError(f"clip_mode must be 'global' or 'per_module', got {cfg.clip_mode!r}")
        ds_clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
        if cfg.clip_mode == "per_module" and cfg.clip_grad > 0:
            if ds_clip > 0:
                raise ValueError("clip_mode=per_module: DeepSpeed's gradient_clipping must be 0 (dvtrain clips)")
            precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
            problem = per_module_clipping_problem(self.zero_stage, precision, self.offload)
            if problem:
                raise ValueError(problem)
        if cfg.clip_mode == "global" and abs(ds_clip - cfg.clip_grad) > 0:
            raise ValueError(f"clip_mode=global: DeepSpeed gradient_clipping={ds_clip} differs from clip_grad="
                             f"{cfg.clip_grad}")

    @torch.no_grad()
    def _init_teacher_master(self) -> list[torch.Tensor | None]:
        """fp32 master per teacher parameter (None = the compute tensor itself is fp32 and is the master)."""
        masters: list[torch.Tensor | None] = []
        for p in self.teacher_params:
            local = self._teacher_local(p)
            masters.append(None if local.dtype == torch.float32 else local.detach().float().clone())
        return masters

    # ------------------------------------------------------------------ properties
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (set ``lr`` / ``weight_decay`` here every iteration)."""
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        """Current loss scale (1.0 unless fp16 with loss scaling)."""
        if self.dtype != torch.float16:
            return 1.0
        return float(getattr(self._ds_opt, "loss_scale", getattr(self._ds_opt, "cur_scale", 1.0)))

    @property
    def min_loss_scale(self) -> float:
        """The dynamic scaler's minimum (``fp16.min_loss_scale``; 1.0 when not fp16)."""
        scaler = getattr(self._ds_opt, "loss_scaler", None)
        return float(getattr(scaler, "min_scale", 1.0)) if self.dtype == torch.float16 else 1.0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped since the start (restored from checkpoints)."""
        return int(self.engine.skipped_steps)

    @property
    def world_size(self) -> int:
        """Data-parallel ranks."""
        return int(self.engine.dp_world_size)

    @property
    def rank(self) -> int:
        """Global rank."""
        return torch_dist.get_rank() if torch_dist.is_initialized() else 0

    def is_gradient_accumulation_boundary(self) -> bool:
        """The next ``backward``/``step`` completes an accumulation window (an optimizer update)."""
        return bool(self.engine.is_gradient_accumulation_boundary())

    # ------------------------------------------------------------------ forward / backward / step
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module through the engine (ZeRO-3 gathers what each sub-module needs)."""
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (DeepSpeed divides by the accumulation steps and scales fp16)."""
        self.engine.backward(loss)

    def step(self) -> StepResult | None:
        """``engine.step()`` after each micro-batch; at the accumulation boundary, per-module clipping
        first (when configured) and the outcome.

        Returns:
            :class:`StepResult` at the boundary; None for the other micro-batches.
        """
        boundary = self.is_gradient_accumulation_boundary()
        scale_before = self.loss_scale
        module_norms: dict[str, float] = {}
        if boundary and self._clip_index:
            module_norms = self._clip_per_module_()
        self.engine.step()
        if not boundary:
            return None
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm() if applied else None
        if isinstance(norm, torch.Tensor):
            norm = float(norm)
        if norm is not None and (norm < 0 or not math.isfinite(norm)):
            norm = None
        return StepResult(applied, scale_before, self.loss_scale, norm, module_norms)

    @torch.no_grad()
    def _clip_per_module_(self) -> dict[str, float]:
        """Clip each configured student sub-module's gradient to ``clip_grad`` (``dinov2/train/
        ssl_meta_arch.py``: ``clip_grad_norm_`` per student sub-module). Runs on the reduced,
        partitioned (ZeRO-3) gradients before ``engine.step``; one all-reduce of a [modules] vector.
        Non-finite norms leave the gradients untouched (DeepSpeed then skips the step)."""
        n = len(self.clip_module_names)
        pairs: list[tuple[int, torch.Tensor]] = []
        if self.zero_stage == 3:
            opt = self._ds_opt
            for i, group in enumerate(opt.fp16_groups):
                grads = opt.averaged_gradients[i]
                for p, g in zip(group, grads):
                    if id(p) in self._clip_index and g is not None:
                        pairs.append((self._clip_index[id(p)], g))
        else:  # stage 0, fp32: full gradients already all-reduced at the boundary
            for p in self.student_params:
                if id(p) in self._clip_index and p.grad is not None:
                    pairs.append((self._clip_index[id(p)], p.grad))
        if not pairs:
            return {}
        device = pairs[0][1].device
        by_module: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for idx, g in pairs:
            by_module[idx].append(g)
        # one foreach norm per module (fp32 accumulation) instead of a Python loop over tensors
        zero = torch.zeros((), dtype=torch.float32, device=device)
        sq = torch.stack([
            torch.stack(torch._foreach_norm(gs, 2.0, dtype=torch.float32)).square().sum() if gs else zero
            for gs in by_module
        ])
        if self.zero_stage == 3 and torch_dist.is_initialized() and self.world_size > 1:
            torch_dist.all_reduce(sq)
        norms = sq.sqrt() / self.loss_scale
        coefs = (self.config.clip_grad / (norms + 1e-6)).clamp(max=1.0)
        coefs = torch.where(torch.isfinite(norms), coefs, torch.ones_like(coefs))
        for idx, gs in enumerate(by_module):
            if gs:
                torch._foreach_mul_(gs, coefs[idx].to(gs[0].dtype))
        return {name: float(v) for name, v in zip(self.clip_module_names, norms.tolist())}

    # ------------------------------------------------------------------ teacher EMA
    def _teacher_local(self, p: torch.Tensor) -> torch.Tensor:
        """The local storage of a teacher parameter: its partition (ZeRO-3) or the full tensor."""
        if self.zero_stage == 3:
            assert getattr(p, "ds_tensor", None) is not None, "ZeRO-3 teacher parameter without ds_tensor"
            return p.ds_tensor
        return p.data

    def _student_fp32(self, p: torch.Tensor) -> torch.Tensor:
        """The student's fp32 master over the same elements as :meth:`_teacher_local` of its twin."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param  # noqa: PLC0415

        if self.zero_stage == 3:
            s = safe_get_local_fp32_param(p) if p.requires_grad else None
            return s if s is not None else p.ds_tensor.float()
        if self.dtype == torch.float32:
            return p.data
        s = safe_get_full_fp32_param(p) if p.requires_grad else None
        return s if s is not None else p.data.float()

    def _teacher_masters(self) -> list[torch.Tensor]:
        return [m if m is not None else self._teacher_local(p) for m, p in zip(self._teacher_master, self.teacher_params)]

    @torch.no_grad()
    def update_teacher(self, momentum: float, skip_prefixes: Sequence[str] = ()) -> None:
        """EMA of the teacher on this rank's fp32 shards (module docstring), then refresh the compute copy.

        No collective under ZeRO-3 and under ZeRO-0/1/2 in fp32; ZeRO-1/2 in bf16/fp16 all-reduce the
        student's fp32 masters per parameter (``safe_get_full_fp32_param``).

        Args:
            momentum: m in [0, 1] (teacher momentum schedule).
            skip_prefixes: teacher parameters whose name starts with one of these keep their value
                (momentum 1; e.g. ``("backbone.",)`` while the backbone is frozen).

        Raises:
            ValueError / RuntimeError: see :func:`ema_update_`.
        """
        masters = self._teacher_masters()
        keep = [i for i, n in enumerate(self.teacher_names) if not n.startswith(tuple(skip_prefixes))]
        students = [self._student_fp32(self.student_params[i]) for i in keep]
        ema_update_([masters[i] for i in keep], students, momentum, [self.teacher_names[i] for i in keep])
        self._write_teacher_compute(masters)

    @torch.no_grad()
    def _write_teacher_compute(self, masters: list[torch.Tensor]) -> None:
        """Copy fp32 masters into the teacher's compute tensors; drop stale resident ZeRO-3 copies."""
        for m, master, p in zip(self._teacher_master, masters, self.teacher_params):
            if m is not None:
                self._teacher_local(p).copy_(master)
        if self.zero_stage == 3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: PLC0415

            resident = [p for p in self.teacher_params if p.ds_status == ZeroParamStatus.AVAILABLE]
            if resident:
                # Persistent (and any other resident) teacher params: free the full copy locally; the next
                # forward gathers it from the updated shards.
                resident[0].partition(param_list=resident, has_been_updated=False)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path) -> None:
        """Write the engine state into ``directory`` (collective: every rank calls it).

        Files: DeepSpeed's checkpoint under ``directory/ds/`` (module buffers, student fp32 masters,
        AdamW state, loss scaler, step counters) and ``teacher_rank<r>.pt`` (this rank's teacher fp32
        masters, with names and partition sizes for validation).
        """
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), tag=layout.DS_TAG, client_state={}, save_latest=False)
        masters = [t.detach().cpu().clone() for t in self._teacher_masters()]
        state = dict(zip(layout.TEACHER_KEYS, (list(self.teacher_names), [t.numel() for t in masters], masters,
                                                self.zero_stage, self.world_size, self.rank)))
        torch.save(state, directory / layout.rank_file(layout.TEACHER_FILE, self.rank))

    @torch.no_grad()
    def load(self, directory: str | Path) -> None:
        """Restore what :meth:`save` wrote (collective). The world size must match the checkpoint's.

        Raises:
            ValueError: missing files, or teacher shards written with another world size, ZeRO stage
                or model.
        """
        directory = Path(directory)
        tfile = directory / layout.rank_file(layout.TEACHER_FILE, self.rank)
        if not tfile.is_file() or not (directory / layout.DS_TAG).is_dir():
            raise ValueError(f"{directory}: not an engine checkpoint (missing {tfile.name} or {layout.DS_TAG}/)")
        state = torch.load(tfile, map_location="cpu", weights_only=True)
        if state["world_size"] != self.world_size or state["zero_stage"] != self.zero_stage:
            raise ValueError(
                f"{directory}: teacher shards were written by {state['world_size']} rank(s) at ZeRO stage "
                f"{state['zero_stage']}; this run has {self.world_size} rank(s) at stage {self.zero_stage}"
            )
        if state["names"] != list(self.teacher_names):
            raise ValueError(f"{directory}: teacher parameter names differ from this model's")
        load_path, _ = self.engine.load_checkpoint(
            str(directory), tag=layout.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
        )
        if load_path is None:
            raise ValueError(f"{directory}/{layout.DS_TAG}: DeepSpeed found no checkpoint to load")
        masters = self._teacher_masters()
        for name, dst, src in zip(self.teacher_names, masters, state["masters"]):
            if dst.numel() != src.numel():
                raise ValueError(f"{directory}: teacher shard of {name} has {src.numel()} elements, expected "
                                 f"{dst.numel()}")
            dst.copy_(src.view(dst.shape))
        self._write_teacher_compute(masters)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def gather_fp32_state_dict(self, which: str = "teacher", prefix: str = "backbone.") -> dict[str, torch.Tensor]:
        """Consolidated fp32 state dict of ``model.<which>`` entries under ``prefix``, on EVERY rank.

        Collective: every rank must call it. Parameters are full-shape fp32 CPU tensors (teacher: the
        fp32 EMA masters; student: the optimizer's fp32 masters), never 0-element placeholders;
        buffers under the prefix are included as they are (fp32).

        Args:
            which: ``"teacher"`` or ``"student"``.
            prefix: key prefix inside the sub-module (``"backbone."``, ``"dino_head."``, ``""`` = all);
                stripped from the returned keys.

        Returns:
            dict name -> tensor (keys relative to ``prefix``, e.g. ``blocks.0.attn.qkv.weight``).

        Raises:
            ValueError: unknown ``which`` or a prefix that matches nothing.
        """
        from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

        if which not in ("teacher", "student"):
            raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
        names = self.teacher_names if which == "teacher" else self.student_names
        params = self.teacher_params if which == "teacher" else self.student_params
        out: dict[str, torch.Tensor] = {}
        masters = self._teacher_masters() if which == "teacher" else None
        for i, (name, p) in enumerate(zip(names, params)):
            if not name.startswith(prefix):
                continue
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if which == "teacher":
                local = masters[i].float()
                parts = self._all_gather(local) if self.zero_stage == 3 else [local]
            else:
                full = safe_get_full_fp32_param(p) if p.requires_grad else None
                if full is not None:
                    parts = [full]
                elif self.zero_stage == 3:
                    parts = self._all_gather(p.ds_tensor.float())
                else:
                    parts = [p.data.float()]
            out[name[len(prefix):]] = join_partitions(parts, shape, f"{which}.{name}").detach().cpu().float()
        sub = self.module.teacher if which == "teacher" else self.module.student
        for name, b in sub.named_buffers():
            if name.startswith(prefix):
                out[name[len(prefix):]] = b.detach().cpu().float().clone()
        if not out:
            raise ValueError(f"no {which} parameter starts with {prefix!r}")
        return out

    def _all_gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's equally sized 1-D partition, in rank order (join with ``join_partitions``)."""
        local = local.reshape(-1).contiguous()
        if not torch_dist.is_initialized() or self.world_size == 1:
            return [local]
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, local)
        return parts

    def destroy(self) -> None:
        """Release DeepSpeed resources (hooks, buffers)."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
