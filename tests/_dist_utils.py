"""Run a test function in N gloo processes on 127.0.0.1 (CPU DeepSpeed), collect results via files.

Usage inside a test::

    results = run_ranks(__file__, "_worker_fn", world_size=2, tmp_path=tmp_path, args={"m": 0.9})

``_worker_fn(rank, world_size, args, out_dir)`` is a module-level function of the calling test file;
each rank's return value (tensors, numbers, dicts) is ``torch.save``-d to ``out_dir/rank<r>.pt`` and
returned as a list ordered by rank. Every rank runs with ``DS_ACCELERATOR=cpu``, one torch thread
(ranks x threads <= cores), a free ``MASTER_PORT`` and ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, and
initialises the process group with ``dvtrain.dist.init_distributed`` before calling the function.

Run as a script (what ``run_ranks`` spawns): ``python _dist_utils.py <test file> <function> <out dir>``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


def run_ranks(test_file: str, fn_name: str, world_size: int, tmp_path: Path, args: dict | None = None,
              timeout_s: float = 240.0) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn_name`` of ``test_file``; return their results.

    Raises:
        RuntimeError: a rank exited non-zero or timed out (its stderr tail is included).
    """
    import torch

    out_dir = Path(tmp_path) / f"ranks_{fn_name}_{time.time_ns()}"
    out_dir.mkdir(parents=True)
    (out_dir / "args.json").write_text(json.dumps(args or {}))
    from dvtrain.dist import find_free_port

    port = find_free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update({
            "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        })
        log = open(out_dir / f"log{rank}.txt", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(Path(test_file).resolve()), fn_name, str(out_dir)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(_HERE.parent)), log))
    deadline = time.time() + timeout_s
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            tail = (out_dir / f"log{rank}.txt").read_text()[-3000:]
            failed.append(f"rank {rank} exit {rc}:\n{tail}")
    if failed:
        raise RuntimeError("\n".join(failed))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _main() -> None:
    test_file, fn_name, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    sys.path.insert(0, str(_HERE))
    import torch

    torch.set_num_threads(1)
    from dvtrain.dist import init_distributed

    init_distributed(backend="gloo")
    spec = importlib.util.spec_from_file_location("_rank_test_module", test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = json.loads((out_dir / "args.json").read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = getattr(module, fn_name)(rank, world, args, out_dir)
    torch.save(result, out_dir / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main()


# --------------------------------------------------------------------------------------------------
# Shared tiny fixtures for the engine / trainer tests (importable by tests and by rank processes).
# --------------------------------------------------------------------------------------------------

def tiny_recipe(precision: str = "fp32", stage: int = 3, micro_batch: int = 4, **sections):
    """A CPU-sized recipe: vit_tiny narrowed to width 32, depth 2, 28 px global / 14 px local crops
    (4 / 1 patch tokens), 2 local crops, 64 prototypes; 10 iterations per epoch, 1 epoch.
    ``sections`` are merged into the recipe dict, e.g. ``optim={"clip_mode": "per_module"}``."""
    from dvtrain.recipe import recipe_from_dict

    d = {
        "model": {"arch": "vit_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.1},
        "crops": {"global_size": 28, "local_size": 14, "num_local_crops": 2},
        "loss": {"num_prototypes": 64, "bottleneck_dim": 16, "head_hidden_dim": 32},
        "optim": {"warmup_epochs": 0.2, "freeze_last_layer_epochs": 0, "base_lr": 0.05},
        "teacher": {"temp_warmup_epochs": 0.5},
        "schedule": {"epochs": 1, "iterations_per_epoch": 10},
        "batch": {"micro_batch_per_device": micro_batch},
        "precision": precision,
        "zero": {"stage": stage},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            d.setdefault(key, {}).update(value)
        else:
            d[key] = value
    return recipe_from_dict(d)


def make_batch(step: int, batch_size: int = 4, num_local: int = 2, offset: int = 0) -> dict:
    """Deterministic collated micro-batch number ``step`` (real ``collate_multicrop`` with iBOT masks);
    images ``offset .. offset + batch_size - 1`` of that step's pool, so disjoint slices of one step
    can be merged with :func:`merge_batches`."""
    import numpy as np
    import torch

    from dvtrain.data.collate import collate_multicrop

    samples = []
    for i in range(offset, offset + batch_size):
        g = torch.Generator().manual_seed(100_000 * (step + 1) + i)
        samples.append({"global_crops": [torch.randn(3, 28, 28, generator=g) for _ in range(2)],
                        "local_crops": [torch.randn(3, 14, 14, generator=g) for _ in range(num_local)]})
    return collate_multicrop(samples, n_tokens=4, generator=np.random.default_rng(7919 * (step + 1) + offset))


def merge_batches(batches: list[dict]) -> dict:
    """One collated batch equal to the concatenation of several (per crop slot, masks re-indexed):
    what one rank with micro-batch sum(B_i) sees when rank / micro-batch i saw ``batches[i]``."""
    import torch

    def per_slot(key: str, slots: int) -> torch.Tensor:
        chunks = [b[key].chunk(slots) for b in batches]
        return torch.cat([c[s] for s in range(slots) for c in chunks])

    n_local = batches[0]["collated_local_crops"].shape[0] // (batches[0]["collated_global_crops"].shape[0] // 2)
    masks = per_slot("collated_masks", 2)
    counts = masks.sum(-1, keepdim=True).clamp(min=1).expand_as(masks)
    idx = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": per_slot("collated_global_crops", 2),
        "collated_local_crops": per_slot("collated_local_crops", n_local) if n_local else batches[0]["collated_local_crops"],
        "collated_masks": masks,
        "mask_indices_list": idx,
        "masks_weight": (1.0 / counts.float()).flatten()[idx],
        "n_masked_patches": torch.tensor([idx.numel()]),
        "upperbound": sum(b["upperbound"] for b in batches),
    }


def twin_linear(dim: int = 8, student_value: float | None = None, teacher_value: float | None = None):
    """The smallest module with the meta-architecture interface: ``student``/``teacher`` ModuleDicts
    with one ``backbone`` Linear(dim, dim) each (teacher frozen, own storage); ``forward(x, scale=1.0)``
    (or ``forward({"x": x, "scale": s}, teacher_temp)``) returns ``{"total": scale * sum(student(x)),
    "teacher_out": teacher(x)}``; ``param_groups`` and a
    no-op ``apply_center_update`` for the Trainer."""
    import copy

    import torch
    from torch import nn

    class TwinLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.ModuleDict({"backbone": nn.Linear(dim, dim)})
            self.teacher = copy.deepcopy(self.student)
            for p in self.teacher.parameters():
                p.requires_grad_(False)

        def forward(self, x, scale=1.0, teacher_temp=None):
            if isinstance(x, dict):  # Trainer batches: {"x": [B, dim], "scale": scalar tensor}
                x, scale = x["x"], float(x.get("scale", 1.0))
            x = x.to(self.teacher.backbone.weight.dtype)
            with torch.no_grad():
                t = self.teacher.backbone(x)
            y = self.student.backbone(x)
            return {"total": y.float().sum() * scale, "teacher_out": t}

        def param_groups(self, *_args, **_kw):
            return [{"params": list(self.student.parameters()), "lr_multiplier": 1.0, "wd_multiplier": 0.0,
                     "is_last_layer": False}]

        def apply_center_update(self):
            pass

    m = TwinLinear()
    with torch.no_grad():
        if student_value is not None:
            for p in m.student.parameters():
                p.fill_(student_value)
        if teacher_value is not None:
            for p in m.teacher.parameters():
                p.fill_(teacher_value)
    return m


def ds_config(precision: str = "fp32", stage: int = 3, persistence: int = 100_000, micro_batch: int = 1,
              world_size: int = 1, grad_accum: int = 1, clip: float = 0.0) -> dict:
    """A DeepSpeed config for the engine tests (the same keys ``resolve_ds_config`` fills)."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence
    return {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size, "gradient_clipping": clip,
        "zero_optimization": zero, "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2,
                 "min_loss_scale": 1},
        "steps_per_print": 10**9,
    }


def allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 when oneDNN lacks fp16 kernels, although torch computes
    fp16 on CPU correctly (slowly). Lift only that capability check so the real fp16 engine (loss
    scaler, overflow detection) runs in CPU tests."""
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True


class Box:
    """A stateful checkpoint part holding a dict (stands in for the data loader in unit tests)."""

    def __init__(self, **state):
        self.state = dict(state)

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)
