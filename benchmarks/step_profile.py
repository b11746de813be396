"""Where the time of one DINOv2 training step goes: timing and profiling of the real step.

Builds the real :class:`dvtrain.train.trainer.Trainer` (DeepSpeed ZeRO stage 3 or 0, one process) or a
plain-torch step (``torch.optim.AdamW(fused=True)``, as the engine, + per-module ``clip_grad_norm_`` + ``SSLMetaArch.update_teacher``,
autocast for bf16) for a recipe, feeds it synthetic collated batches of the recipe's shapes (random
pixels, real ``collate_multicrop`` masks) and either times the steps or profiles them:

- ``--mode time``: median ms per step and images/s of each variant, steps interleaved across variants
  in one process (the machine is shared, so both see the same load).
- ``--mode torch``: ``torch.profiler`` over the timed steps with ``record_function`` ranges wrapped around
  the step's parts (teacher, student backbone, heads, losses, backward, clipping, optimizer, EMA,
  DeepSpeed's fetch/release); prints the ranges (inclusive CPU time per step) and the top operators.
- ``--mode spans``: the same ranges, timed with ``perf_counter`` only (no profiler overhead).

Presets: ``--recipe recipes/smoke_cpu.yaml`` (the main job's model) or ``--preset train_step``
(``benchmarks/train_step.py``'s default configuration). ``--set a.b=v`` overrides recipe fields.

Usage::

    DS_ACCELERATOR=cpu python benchmarks/step_profile.py --recipe recipes/smoke_cpu.yaml --variants zero3,zero0,plain
    DS_ACCELERATOR=cpu python benchmarks/step_profile.py --preset train_step --mode spans --variants zero3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

_TORCH_LINEAR = None  # torch's own F.linear, saved before DeepSpeed swaps it process-wide


def load_preset(args):
    """The recipe to benchmark (validated)."""
    from dvtrain.recipe import load_recipe, recipe_from_dict

    sets = list(args.set or [])
    if args.preset == "train_step":
        from _dist_utils import tiny_recipe

        r = tiny_recipe(
            precision="fp32", micro_batch=16,
            model={"embed_dim": 192, "depth": 12, "num_heads": 3, "drop_path_rate": 0.0},
            crops={"global_size": 112, "local_size": 56, "num_local_crops": 4},
            loss={"num_prototypes": 8192, "bottleneck_dim": 256, "head_hidden_dim": 2048},
            optim={"clip_mode": "per_module", "clip_grad": 3.0},
            schedule={"epochs": 10, "iterations_per_epoch": 100},
        )
        data = r.model_dump(mode="json")
    elif args.preset == "step_ratio":
        # ../shared/reference/refstep/step_ratio.py's configuration (our side of it)
        head = {"num_prototypes": 256, "head_hidden_dim": 128, "bottleneck_dim": 64}
        data = recipe_from_dict({
            "model": {"arch": "vit_small", "patch_size": 8, "drop_path_rate": 0.1},
            "crops": {"global_size": 32, "local_size": 16, "num_local_crops": 2},
            "loss": head | {"ibot_separate_head": True, "ibot_num_prototypes": 256, "ibot_hidden_dim": 128,
                            "ibot_bottleneck_dim": 64, "centering": "sinkhorn_knopp", "koleo_weight": 0.1},
            "optim": {"clip_mode": "per_module", "clip_grad": 3.0, "freeze_last_layer_epochs": 0},
            "schedule": {"epochs": 10, "iterations_per_epoch": 100},
            "batch": {"micro_batch_per_device": 4}, "precision": "fp32", "zero": {"stage": 3},
        }).model_dump(mode="json")
    else:
        data = load_recipe(args.recipe).model_dump(mode="json")
    from dvtrain.recipe import apply_override

    data.setdefault("wandb", {})["mode"] = "disabled"
    for ov in sets:
        apply_override(data, ov)
    return recipe_from_dict(data, source="benchmark")


def synthetic_batches(recipe, n: int, seed: int = 0):
    """``n`` collated batches with the recipe's crop sizes and masking (random pixels)."""
    import numpy as np
    import torch

    from dvtrain.data.collate import collate_multicrop

    c, m = recipe.crops, recipe.masking
    g = torch.Generator().manual_seed(seed)
    n_tokens = (c.global_size // recipe.model.patch_size) ** 2
    out = []
    for s in range(n):
        samples = [{"global_crops": [torch.randn(3, c.global_size, c.global_size, generator=g) for _ in range(2)],
                    "local_crops": [torch.randn(3, c.local_size, c.local_size, generator=g)
                                    for _ in range(c.num_local_crops)]} for _ in range(recipe.batch.micro_batch_per_device)]
        out.append(collate_multicrop(samples, mask_ratio_min_max=tuple(m.ratio_min_max),
                                     mask_probability=m.sample_probability, n_tokens=n_tokens,
                                     generator=np.random.default_rng(s)))
    return out


def build_variant(recipe, variant: str):
    """``step(batch) -> None`` of one variant: ``zero3``/``zero0`` (the Trainer) or ``plain``, optionally
    with recipe overrides after a colon, ``;``-separated: ``zero3:model.compile=true``."""
    import torch

    from dvtrain.recipe import apply_override, recipe_from_dict

    if ":" in variant:
        variant, overrides = variant.split(":", 1)
        data = recipe.model_dump(mode="json")
        for ov in overrides.split(";"):
            apply_override(data, ov)
        recipe = recipe_from_dict(data, source="benchmark")

    if variant in ("zero3", "zero0"):
        from dvtrain.recipe import recipe_from_dict
        from dvtrain.train.trainer import Trainer

        data = recipe.model_dump(mode="json")
        data["zero"]["stage"] = 3 if variant == "zero3" else 0
        if variant == "zero0" and data["precision"] != "fp32" and data["optim"]["clip_mode"] == "per_module":
            data["optim"]["clip_mode"] = "global"  # per-module clipping at stage 0 is fp32 only
        tr = Trainer(recipe_from_dict(data, source="benchmark"))

        def step(batch):
            tr.train_step(batch)
        step.trainer = tr
        return step

    import random

    import numpy as np

    from dvtrain.train.meta_arch import SSLMetaArch
    from dvtrain.train.param_groups import apply_schedule_to_param_groups
    from dvtrain.train.meta_arch import meta_arch_config_from_recipe
    from dvtrain.train.trainer import schedules_from_recipe

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    model = SSLMetaArch(meta_arch_config_from_recipe(recipe))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.precision]
    o = recipe.optim
    sched = schedules_from_recipe(recipe, 1)
    groups = model.param_groups(o.layerwise_decay, o.patch_embed_lr_mult)
    for gr in groups:
        gr.pop("names", None)
    opt = torch.optim.AdamW(groups, lr=0.0, betas=o.betas, eps=o.eps, weight_decay=0.0, fused=True)  # as the engine
    model.train()
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    it = [0]

    def step(batch):
        ds_linear, torch.nn.functional.linear = torch.nn.functional.linear, _TORCH_LINEAR
        try:
            sc = sched.at(it[0])
            apply_schedule_to_param_groups(opt.param_groups, sc["lr"], sc["wd"], sc["last_layer_lr"])
            with autocast:
                losses = model(batch, teacher_temp=sc["teacher_temp"])
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            with _span("clip"):
                if o.clip_mode == "per_module":
                    for sub in model.student.values():
                        torch.nn.utils.clip_grad_norm_(sub.parameters(), o.clip_grad)
                else:
                    torch.nn.utils.clip_grad_norm_(model.student.parameters(), o.clip_grad)
            with _span("optimizer"):
                opt.step()
            model.apply_center_update()
            model.update_teacher(sc["momentum"])
            it[0] += 1
        finally:
            torch.nn.functional.linear = ds_linear
    step.model = model
    return step


# ---------------------------------------------------------------------------------------------- spans
_SPANS: dict[str, float] = defaultdict(float)
_SPAN_MODE = "off"  # "off" | "time" | "torch"
_SPAN_STACK: list[str] = []


@contextlib.contextmanager
def _span(name: str):
    if _SPAN_MODE == "off":
        yield
        return
    if _SPAN_MODE == "torch":
        import torch

        with torch.profiler.record_function("@" + name):
            yield
        return
    t0 = time.perf_counter()
    _SPAN_STACK.append(name)
    try:
        yield
    finally:
        _SPAN_STACK.pop()
        if name not in _SPAN_STACK:  # recursion-safe: count the outermost occurrence only
            _SPANS[name] += time.perf_counter() - t0


def _wrap(owner, attr: str, name: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with _span(name):
            return fn(*a, **k)
    setattr(owner, attr, wrapped)


def install_spans() -> None:
    """Wrap the parts of a step in named spans (class-level patches, before anything is built)."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as ppc
    import torch

    from dvtrain.losses.dino import DINOLoss
    from dvtrain.losses.ibot import iBOTPatchLoss
    from dvtrain.losses.koleo import KoLeoLoss
    from dvtrain.models import layers, vit
    from dvtrain.models.heads import DINOHead
    from dvtrain.train import engine, meta_arch, trainer

    _wrap(meta_arch.SSLMetaArch, "_teacher_targets", "teacher (backbone+head+targets)")
    _wrap(vit.DinoVisionTransformer, "forward_features_list", "student backbone fwd")
    _wrap(vit.DinoVisionTransformer, "prepare_tokens_with_masks", "prepare tokens")
    _wrap(layers.Attention, "forward", "attention (qkv, sdpa, proj)")
    for cls in (layers.Mlp, layers.SwiGLUFFN):
        _wrap(cls, "forward", "ffn")
    _wrap(DINOHead, "forward", "heads")
    _wrap(DINOLoss, "forward", "dino loss")
    _wrap(iBOTPatchLoss, "forward_masked", "ibot loss")
    _wrap(KoLeoLoss, "forward", "koleo loss")
    _wrap(engine.ShardedTeacherEngine, "forward", "forward (all)")
    _wrap(engine.ShardedTeacherEngine, "backward", "backward")
    _wrap(engine.ShardedTeacherEngine, "step", "step (clip+optimizer)")
    _wrap(engine.ShardedTeacherEngine, "_clip_per_module_", "clip")
    _wrap(engine.ShardedTeacherEngine, "update_teacher", "ema")
    _wrap(meta_arch.SSLMetaArch, "apply_center_update", "center update")
    _wrap(meta_arch.SSLMetaArch, "update_teacher", "ema")
    _wrap(trainer.Trainer, "train_step", "train_step")
    _wrap(ppc.PartitionedParameterCoordinator, "fetch_sub_module", "ds fetch_sub_module")
    _wrap(ppc.PartitionedParameterCoordinator, "release_sub_module", "ds release_sub_module")
    _wrap(torch.optim.AdamW, "step", "optimizer")


def main() -> None:
    global _TORCH_LINEAR, _SPAN_MODE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--recipe", default=str(REPO / "recipes" / "smoke_cpu.yaml"))
    g.add_argument("--preset", choices=["train_step", "step_ratio"], default=None)
    p.add_argument("--set", action="append", help="recipe override a.b=v (repeatable)")
    p.add_argument("--variants", default="zero3,zero0,plain")
    p.add_argument("--mode", choices=["time", "spans", "torch"], default="time")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--top", type=int, default=25, help="operators shown (--mode torch)")
    args = p.parse_args()

    import torch

    _TORCH_LINEAR = torch.nn.functional.linear
    if args.mode != "time":
        install_spans()
    import deepspeed

    from dvtrain.dist import init_distributed

    init_distributed(set_threads=False)
    torch.set_num_threads(args.threads)
    recipe = load_preset(args)
    variants = args.variants.split(",")
    steps = {v: build_variant(recipe, v) for v in variants}
    torch.set_num_threads(args.threads)
    batches = synthetic_batches(recipe, 2)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads; torch "
          f"{torch.__version__}, deepspeed {deepspeed.__version__}; load {' '.join(load)}")
    print(f"# recipe {args.preset or args.recipe} {args.set or ''}: {recipe.model.arch} d{recipe.model.embed_dim} "
          f"L{recipe.model.depth} p{recipe.model.patch_size}, crops {recipe.crops.global_size}/"
          f"{recipe.crops.local_size}x{recipe.crops.num_local_crops}, batch {recipe.batch.micro_batch_per_device}, "
          f"{recipe.precision}")
    for i in range(args.warmup):
        for v in variants:
            steps[v](batches[i % 2])
    times: dict[str, list[float]] = {v: [] for v in variants}
    spans: dict[str, dict[str, float]] = {}
    prof = None
    if args.mode == "torch":
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    _SPAN_MODE = {"time": "off", "spans": "time", "torch": "torch"}[args.mode]
    for v in variants:
        spans[v] = {}
    for i in range(args.steps):
        for v in variants:
            _SPANS.clear()
            t0 = time.perf_counter()
            with _span("step " + v):
                steps[v](batches[i % 2])
            times[v].append(time.perf_counter() - t0)
            for k, val in _SPANS.items():
                spans[v][k] = spans[v].get(k, 0.0) + val
    _SPAN_MODE = "off"
    B = recipe.batch.micro_batch_per_device
    med = {v: statistics.median(t) for v, t in times.items()}
    for v in variants:
        q = sorted(times[v])
        print(f"{v:6s} median {1e3 * med[v]:8.1f} ms  min {1e3 * q[0]:8.1f}  max {1e3 * q[-1]:8.1f}  "
              f"{B / med[v]:7.1f} images/s")
    for v in variants[1:]:
        print(f"ratio {v}/{variants[0]} = {med[v] / med[variants[0]]:.3f}")
    if args.mode == "spans":
        for v in variants:
            print(f"\n## spans of {v} (ms per step, inclusive; nested spans are also inside their parents)")
            for k, val in sorted(spans[v].items(), key=lambda kv: -kv[1]):
                print(f"  {1e3 * val / args.steps:8.1f}  {k}")
    if prof is not None:
        prof.__exit__(None, None, None)
        ka = prof.key_averages()
        rows = [(e.key, e.cpu_time_total / 1e3 / args.steps, e.self_cpu_time_total / 1e3 / args.steps, e.count)
                for e in ka]
        print("\n## spans (ms per step, inclusive, all variants together)")
        for k, tot, _, cnt in sorted([r for r in rows if r[0].startswith("@")], key=lambda r: -r[1]):
            print(f"  {tot:8.1f}  {k[1:]}  (x{cnt / args.steps:.0f}/step)")
        print(f"\n## top {args.top} operators by self CPU time (ms per step, all variants together)")
        for k, _, self_t, cnt in sorted([r for r in rows if not r[0].startswith("@")], key=lambda r: -r[2])[:args.top]:
            print(f"  {self_t:8.1f}  {k}  (x{cnt / args.steps:.0f}/step)")


if __name__ == "__main__":
    main()
