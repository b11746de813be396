"""``dvtrain launch``: pre-flight validation, run directory, multi-process launch, signals, sweeps.

One process runs in place. ``--nproc N`` (one node) and ``--hostfile F`` (many nodes) re-launch the same
command on every rank through DeepSpeed's launcher (``deepspeed --module dvtrain launch ... --worker``);
clusters that start ranks their own way (torchrun, SLURM srun) run that worker command directly, with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import yaml

from dvtrain.data.remote import check_remote, is_remote
from dvtrain.recipe import (
    RECIPE_PATHS,
    Recipe,
    RecipeError,
    dump_recipe,
    load_recipe,
    resolve_ds_config,
)


# --------------------------------------------------------------------------------------------------
# Sweeps: the W&B agent passes --dotted.path=value arguments and writes its parameters to a file.
# --------------------------------------------------------------------------------------------------


def overrides_from_extra_args(args: list[str]) -> list[str]:
    """Turn a W&B agent's ``--key=value`` (or ``--key value``) arguments into ``key=value`` overrides.

    Raises:
        RecipeError: an argument that is not ``--dotted.path=value``.
    """
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise RecipeError([f"unexpected argument {arg!r}: recipe overrides look like --optim.base_lr=2e-4"])
        body = arg[2:]
        if "=" not in body:
            if i + 1 >= len(args):
                raise RecipeError([f"argument {arg!r} has no value: use --{body}=VALUE"])
            body = f"{body}={args[i + 1]}"
            i += 1
        out.append(body)
        i += 1
    return out


def overrides_from_sweep_params(path: str | os.PathLike | None = None) -> list[str]:
    """Overrides from the parameter file the W&B agent writes (``WANDB_SWEEP_PARAM_PATH``).

    The file maps each swept parameter to ``{"value": v}``; keys that are recipe paths become
    ``key=value`` overrides (values serialised as YAML so they are parsed like ``--set``).
    """
    path = path or os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        return []
    params = yaml.safe_load(Path(path).read_text()) or {}
    out = []
    for key, spec in params.items():
        if key.startswith("wandb") or key.startswith("_"):
            continue
        value = spec.get("value") if isinstance(spec, dict) else spec
        if key not in RECIPE_PATHS:
            raise RecipeError([f"{path}: swept parameter {key!r} is not a recipe field"])
        out.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


# --------------------------------------------------------------------------------------------------
# Pre-flight validation (before any process starts)
# --------------------------------------------------------------------------------------------------


def check_data_location(location: str, field: str = "data.path") -> None:
    """A local MDS directory must hold ``index.json``; a remote URL must pass :func:`check_remote`.

    Raises:
        ValueError: naming the field, the location and what would be valid.
    """
    if is_remote(location):
        return check_remote(location, field)  # scheme, credentials, endpoint, index.json; bounded to ~30 s
    path = Path(location)
    if not path.exists():
        raise ValueError(
            f"{field}={location}: no such directory; convert images first with `dvtrain data convert SRC {location}`"
        )
    if not (path / "index.json").is_file():
        raise ValueError(f"{field}={location}: not an MDS dataset (no index.json); write one with `dvtrain data convert`")


def _comparable(recipe_yaml: str) -> dict:
    """The parts of a recipe that define a run (logging and checkpoint cadence may change on resume)."""
    data = yaml.safe_load(recipe_yaml) or {}
    for key in ("wandb", "checkpoint", "eval", "name"):
        data.pop(key, None)
    data.get("data", {}).pop("num_workers", None)
    data.get("data", {}).pop("cache_dir", None)
    return data


def check_output_dir(run_dir: Path, recipe: Recipe, resume: bool) -> bool:
    """Decide whether ``run_dir`` is new, or the same run to resume.

    Returns:
        True when an existing run in ``run_dir`` is resumed.

    Raises:
        ValueError: the directory holds a different run (its recipe differs), or is a non-empty
            directory that is not a dvtrain run.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return False
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise ValueError(f"--output-dir {run_dir}: not empty and not a dvtrain run directory; choose another")
    old, new = _comparable(saved.read_text()), _comparable(dump_recipe(recipe))
    if old != new:
        diffs = sorted(_diff_paths(old, new))
        raise ValueError(
            f"--output-dir {run_dir} holds a different run (recipe differs at {', '.join(diffs[:5])}); "
            "choose a new output directory"
        )
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    return has_ckpt or resume


def _diff_paths(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def preflight(recipe: Recipe, run_dir: Path, resume: bool, world_size: int) -> bool:
    """Every check that must pass before a process starts; returns whether the run resumes.

    Raises:
        RecipeError / ValueError: with a one-line reason.
    """
    resolve_ds_config(recipe, world_size)  # the per-rank batch >= 2 rule is part of recipe validation
    check_data_location(recipe.data.path)
    return check_output_dir(run_dir, recipe, resume)


# --------------------------------------------------------------------------------------------------
# Multi-process launch through DeepSpeed's launcher
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hostfile_world_size(hostfile: Path) -> int:
    """Total slots in an MPI-style hostfile (``host slots=N`` lines).

    Raises:
        ValueError: a missing file or a malformed line (named with its number).
    """
    if not hostfile.is_file():
        raise ValueError(f"--hostfile {hostfile}: no such file")
    total = 0
    for no, line in enumerate(hostfile.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit():
            raise ValueError(f"--hostfile {hostfile}: line {no} {line!r}: expected 'HOSTNAME slots=N'")
        total += int(slots[0][6:])
    if total == 0:
        raise ValueError(f"--hostfile {hostfile}: no hosts")
    return total


def worker_command(recipe_path: Path, overrides: list[str], run_dir: Path, resume: bool) -> list[str]:
    """The per-rank command (``python -m dvtrain launch ... --worker``) without the interpreter."""
    cmd = ["dvtrain", "launch", str(recipe_path), "--output-dir", str(run_dir), "--worker"]
    for ov in overrides:
        cmd += ["--set", ov]
    if resume:
        cmd.append("--resume")
    return cmd


def deepspeed_command(
    recipe_path: Path, overrides: list[str], run_dir: Path, resume: bool, nproc: int | None,
    hostfile: Path | None, master_port: int | None = None,
) -> list[str]:
    """The ``deepspeed`` launcher command that starts every rank of the run."""
    ds = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        ds += ["--hostfile", str(hostfile)]
        if nproc:
            ds += ["--num_accelerators", str(nproc)]
    else:
        ds += ["--num_nodes", "1", "--num_accelerators", str(nproc or 1)]
    ds += ["--master_port", str(master_port or free_port()), "--module", "--no_local_rank"]
    return ds + worker_command(recipe_path, overrides, run_dir, resume)


_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(nproc: int) -> dict[str, str]:
    """Environment of the launched ranks: CPU accelerator without CUDA; torch threads x ranks <= cores."""
    import torch

    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}  # the launcher sets these per rank
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, nproc))))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher in its own process group and forward SIGINT/SIGTERM to the whole group (the
    ranks finish their step, checkpoint and exit); returns the launcher's exit code."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------------
# Signals inside a rank: first signal = checkpoint at the next step boundary and exit; second = now.
# --------------------------------------------------------------------------------------------------


class StopRequest:
    """Installs SIGINT/SIGTERM handlers. The first signal sets :attr:`requested` (the loop finishes the
    step, writes a checkpoint and exits cleanly); a second signal exits at once with status 130. The
    last good checkpoint is never touched by an exit at once, since checkpoints are switched into place
    atomically."""

    #: Seconds after the first signal in which further signals count as the same request (launchers
    #: often send SIGINT and then SIGTERM to every rank).
    GRACE_S = 5.0

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._first_at = 0.0
        self._old: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        import time

        if self.signum is not None:
            if time.monotonic() - self._first_at > self.GRACE_S:
                os._exit(130)
            return
        self._first_at = time.monotonic()
        self.requested = True
        self.signum = signum
        print(f"\n[dvtrain] {signal.Signals(signum).name}: finishing this step, writing a checkpoint, then exiting "
              "(send again to exit at once)", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# --------------------------------------------------------------------------------------------------
# One rank's run
# --------------------------------------------------------------------------------------------------


def build_train_loader(recipe: Recipe, rank_local_dir: Path | None = None):
    """The streaming multi-crop loader of a recipe (MDS shards -> multi-crop -> masks -> collate)."""
    import functools
    import tempfile

    from dvtrain.data.augment import MultiCropAugmentation
    from dvtrain.data.collate import collate_multicrop
    from dvtrain.data.loader import build_loader
    from dvtrain.data.masking import MaskingGenerator

    c, m = recipe.crops, recipe.masking
    grid = c.global_size // recipe.model.patch_size
    mask_generator = MaskingGenerator(
        (grid, grid), max_num_patches=int(0.5 * grid * grid), min_num_patches=m.min_num_patches, min_aspect=m.min_aspect
    )
    collate = functools.partial(
        collate_multicrop, mask_ratio_min_max=tuple(m.ratio_min_max), mask_probability=m.sample_probability,
        n_tokens=grid * grid, mask_generator=mask_generator,
    )
    transform = MultiCropAugmentation(
        c.global_size, c.local_size, c.num_local_crops, global_scale=tuple(c.global_scale),
        local_scale=tuple(c.local_scale), blur=c.blur,
    )
    remote = recipe.data.path if "://" in recipe.data.path else None
    local = recipe.data.path if remote is None else (recipe.data.cache_dir or tempfile.mkdtemp(prefix="dvtrain-mds-"))
    return build_loader(
        local=local, remote=remote, batch_size=recipe.batch.micro_batch_per_device, transform=transform,
        collate_fn=collate, num_workers=recipe.data.num_workers, shuffle=recipe.data.shuffle, seed=recipe.seed,
        drop_last=True,
    )


class _TimedBatches:
    """Endless iterator over the loader's epochs that records the time spent waiting for data."""

    def __init__(self, loader):
        self.loader = loader
        self.wait_s = 0.0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        import time

        t0 = time.perf_counter()
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
        self.wait_s += time.perf_counter() - t0
        return batch


def _peak_memory_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _flops_per_image(recipe: Recipe, model) -> int:
    from dvtrain.flops import HeadShape, ViTShape, train_flops_per_image

    bb = model.student["backbone"]
    ffn = bb.blocks[0].mlp
    hidden = ffn.w3.in_features if hasattr(ffn, "w3") else ffn.fc1.out_features
    shape = ViTShape(bb.embed_dim, len(bb.blocks), hidden, recipe.model.ffn_layer, recipe.model.patch_size,
                     recipe.model.num_register_tokens)
    lo = recipe.loss
    dino = HeadShape(bb.embed_dim, lo.head_hidden_dim, lo.bottleneck_dim, lo.num_prototypes, lo.head_nlayers)
    ibot = (HeadShape(bb.embed_dim, lo.ibot_hidden_dim, lo.ibot_bottleneck_dim, lo.ibot_num_prototypes, lo.head_nlayers)
            if lo.ibot_separate_head else None)
    frac = recipe.masking.sample_probability * sum(recipe.masking.ratio_min_max) / 2
    return train_flops_per_image(shape, dino, ibot, recipe.crops.global_size, recipe.crops.local_size,
                                 recipe.crops.num_local_crops, frac)


_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _denormalise(crop_CHW) -> "Any":
    """A normalised crop [3, H, W] back to uint8 [H, W, 3]."""
    import torch

    mean = torch.tensor(_MEAN).view(3, 1, 1)
    std = torch.tensor(_STD).view(3, 1, 1)
    return ((crop_CHW.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _crop_grid(batch: dict, max_images: int = 4) -> "Any":
    """uint8 [H, W, 3] grid: one row per image, its 2 global crops then its local crops (upsampled)."""
    import numpy as np
    import torch

    g, loc = batch["collated_global_crops"].float(), batch["collated_local_crops"].float()
    b = g.shape[0] // 2
    n_local = loc.shape[0] // b if b else 0
    size = g.shape[-1]
    rows = []
    for i in range(min(b, max_images)):
        crops = [g[i], g[b + i]]
        crops += [torch.nn.functional.interpolate(loc[j * b + i][None], size=(size, size), mode="nearest")[0]
                  for j in range(n_local)]
        rows.append(np.concatenate([_denormalise(c) for c in crops], axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def run_worker(recipe: Recipe, run_dir: Path, resume: bool) -> dict:
    """Train one rank of the run described by ``recipe`` in ``run_dir`` (every rank calls this).

    Writes (rank 0): ``recipe.yaml``, ``ds_config.json``, ``metrics.jsonl``, W&B files, checkpoints,
    ``export/teacher_backbone.pth`` (+ ``.json``), ``summary.json``.

    Returns:
        The summary (same on every rank).
    """
    import math
    import time

    import torch

    from dvtrain import dist
    from dvtrain.flops import peak_flops
    from dvtrain.logging import RunLogger, TrainProgress
    from dvtrain.train.trainer import Trainer

    # torch 2.14 deprecates the collective names DeepSpeed 0.19 calls every step; keep the log readable.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    stop = StopRequest().install()
    t_start = time.time()
    trainer = Trainer(recipe)
    info, d = trainer.dist, trainer.derived
    ckpt_root = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else run_dir / "checkpoints"
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        write_json_atomic(run_dir / "ds_config.json", resolve_ds_config(recipe, info.world_size))
    logger = RunLogger(run_dir, recipe, rank=info.rank, extra_config={"world_size": info.world_size, **d.model_dump()})
    flops_img = _flops_per_image(recipe, trainer.model)
    peak = peak_flops(trainer.device, recipe.precision)
    loader = build_train_loader(recipe)
    # Restore last: everything above must not depend on (or move) the restored RNG states.
    if resume and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
        extra = trainer.load_checkpoint(ckpt_root)
        if "data" in extra:
            loader.load_state_dict(extra["data"])
    start_iteration = trainer.iteration
    progress = TrainProgress(d.total_iterations, start=start_iteration, rank=info.rank)
    batches = _TimedBatches(loader)
    images_per_step = recipe.batch.micro_batch_per_device * recipe.batch.grad_accum_steps
    window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
    last: dict[str, float] = {}
    first_batch: dict = {}

    def on_step(metrics: dict[str, float]) -> None:
        window["steps"] += 1
        last.update(metrics)
        it = trainer.iteration
        if info.world_size > 1:  # every rank stops at the same step
            flag = torch.tensor([1 if stop.requested else 0], dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop.requested = bool(flag.item())
        if stop.requested:
            trainer.request_stop()
        log_now = it % recipe.wandb.log_every == 0 or it == d.total_iterations or stop.requested
        if log_now and window["steps"]:
            now = time.perf_counter()
            elapsed = max(now - window["t"], 1e-9)
            ips = window["steps"] * images_per_step / elapsed
            metrics = dict(metrics)
            metrics.update({
                "images_per_s_per_rank": ips,
                "images_per_s": ips * info.world_size,
                "data_wait_fraction": (batches.wait_s - window["wait"]) / elapsed,
                "mfu": flops_img * ips / peak if peak else math.nan,
                "peak_memory_gib": _peak_memory_gib(trainer.device),
                "images_seen": it * d.global_batch,
            })
            logger.log(it, metrics)
            window.update(t=now, wait=batches.wait_s, steps=0)
            shown = {k: metrics[k] for k in ("total", "dino_global_crops_loss", "ibot_loss", "koleo_loss") if k in metrics}
            shown["img/s"] = metrics["images_per_s"]
            progress.update(it, shown, log_line=True)
        else:
            progress.update(it, {})
        if recipe.wandb.image_every and it % recipe.wandb.image_every == 0:
            _log_pictures(trainer, recipe, logger, it, first_batch)

    def batches_with_first():
        for b in batches:
            if not first_batch:
                first_batch.update(b)
            yield b

    t_fit = time.time()
    try:
        reason = trainer.fit(batches_with_first(), on_step=on_step, checkpoint_dir=ckpt_root,
                             extra_state=lambda: {"data": loader.state_dict()})
    finally:
        progress.close()
    fit_s = time.time() - t_fit
    teacher_sd = trainer.export_teacher_backbone()
    export_path = run_dir / "export" / "teacher_backbone.pth"
    knn = None
    if reason == "done":
        _log_pictures(trainer, recipe, logger, trainer.iteration, first_batch, teacher_sd)
        knn = teacher_knn(recipe, teacher_sd) if recipe.eval.train_path and recipe.eval.val_path else None
        if knn is not None:
            k0 = str(recipe.eval.ks[0])
            logger.log(trainer.iteration, {"knn_top1": knn["per_k"][k0]["top1"], "knn_top5": knn["per_k"][k0]["top5"]})
    if info.rank == 0:
        _export_teacher(recipe, teacher_sd, export_path)
    wall = time.time() - t_start
    summary = {
        "status": reason,
        "iterations": trainer.iteration,
        "total_iterations": d.total_iterations,
        "images_seen": trainer.iteration * d.global_batch,
        "world_size": info.world_size,
        "wall_time_s": wall,
        "train_time_s": fit_s,
        "images_per_s": (trainer.iteration - start_iteration) * d.global_batch / max(fit_s, 1e-9),
        "final_losses": {k: v for k, v in last.items() if k.endswith("_loss") or k == "total"},
        "skipped_steps": int(last.get("skipped_steps", 0)),
        "bad_samples": int(getattr(loader, "num_bad_samples", 0)),
        "teacher_export": str(export_path),
        "checkpoints": str(ckpt_root),
        "wandb_dir": logger.wandb_dir,
        "knn": knn,
    }
    if info.rank == 0:
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        write_json_atomic(run_dir / "summary.json", summary)
    logger.close()
    stop.uninstall()
    dist.barrier()
    return summary


def _export_teacher(recipe: Recipe, teacher_sd: dict, out: Path) -> None:
    from dvtrain.checkpoint_io import LoadedBackbone, backbone_from_recipe, backbone_kwargs
    from dvtrain.export import export_hub

    model = backbone_from_recipe(recipe, teacher_sd)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_hub(LoadedBackbone(model, backbone_kwargs(model), "training", "teacher", {"recipe": recipe.name}), out,
               overwrite=True)


def teacher_knn(recipe: Recipe, teacher_sd: dict) -> dict:
    """k-NN (DINOv2 protocol) of the teacher backbone on ``eval.train_path`` / ``eval.val_path``."""
    import torch

    from dvtrain.checkpoint_io import backbone_from_recipe
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
    """Crop grid of the first batch and the PCA picture of the teacher's patch features (collective)."""
    import numpy as np

    if teacher_sd is None:
        teacher_sd = trainer.export_teacher_backbone()
    if logger.rank != 0 or not batch:
        return
    from PIL import Image

    from dvtrain.checkpoint_io import backbone_from_recipe
    from dvtrain.viz import pca_figure

    grid = _crop_grid(batch)
    model = backbone_from_recipe(recipe, teacher_sd)
    b = batch["collated_global_crops"].shape[0] // 2
    images = [Image.fromarray(_denormalise(batch["collated_global_crops"][i])) for i in range(min(4, b))]
    fig, _ = pca_figure(model, images, image_size=recipe.crops.global_size * 4)
    logger.log_images(it, {"crops": grid, "teacher_pca": np.asarray(fig.convert("RGB"))})


def launch(
    recipe_path: Path, overrides: list[str], output_dir: Path | None, resume: bool, nproc: int | None,
    hostfile: Path | None, worker: bool, extra_args: list[str] = (),
) -> dict | int:
    """``dvtrain launch``: validate everything, then run in place or start the ranks.

    Args:
        recipe_path: recipe YAML. overrides: ``--set`` values. extra_args: a W&B agent's
            ``--dotted.path=value`` arguments (its parameter file, ``WANDB_SWEEP_PARAM_PATH``, is read too).
        output_dir: run directory (default ``runs/<recipe name>``).
        resume: resume from the run directory's latest checkpoint (automatic when it has one).
        nproc: ranks on this node (through the ``deepspeed`` launcher when > 1).
        hostfile: MPI-style hostfile for multi-node runs (``deepspeed`` launcher, pdsh/ssh).
        worker: this process is one rank started by a launcher (validation already done).

    Returns:
        The run summary (one process / worker) or the launcher's exit code (multi-process).

    Raises:
        RecipeError / ValueError: a one-line reason, before any process starts.
    """
    overrides = list(overrides) + overrides_from_extra_args(list(extra_args)) + overrides_from_sweep_params()
    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(output_dir) if output_dir else Path("runs") / recipe.name
    if worker:
        return run_worker(recipe, run_dir, resume)
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    world = hostfile_world_size(hostfile) if hostfile else (nproc or 1)
    if hostfile and nproc:
        world = nproc * len([ln for ln in hostfile.read_text().splitlines() if ln.split("#")[0].strip()])
    resuming = preflight(recipe, run_dir, resume, world)
    if resume and not resuming:
        print(f"[dvtrain] --resume: {run_dir} has no checkpoint yet; starting from iteration 0", file=sys.stderr)
    if world == 1 and hostfile is None:
        return run_worker(recipe, run_dir, resuming)
    cmd = deepspeed_command(recipe_path, overrides, run_dir, resuming, nproc, hostfile)
    print(f"[dvtrain] starting {world} ranks: {format_command(cmd)}", file=sys.stderr, flush=True)
    return run_launcher(cmd, launcher_env(nproc or 1))
