"""Benchmark: one DINOv2 training step through the ZeRO-3 engine vs the same step in plain torch.

Both variants run the same SSLMetaArch (same recipe, seed and batches) on one process and time the
phases of ``dvtrain.train.trainer.Trainer.train_step``: teacher+student forward, backward, optimizer
step (AdamW with the DINOv2 parameter groups, per-module or global clipping), center update and
teacher EMA. The plain variant is ``torch.optim.AdamW`` + ``clip_grad_norm_`` + ``SSLMetaArch.update_teacher``.
Plain and ZeRO-3 steps run interleaved in one process so that both see the same machine load (the
CPU test machine is shared). Activation checkpointing is measured on ZeRO-3 in separate processes:
activation memory = bytes of the tensors autograd saves for backward (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA).

Usage::

    python benchmarks/train_step.py                 # all variants, markdown report on stdout
    python benchmarks/train_step.py --steps 10 --batch 16 --out benchmarks/results/<date>-train-step-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TORCH_LINEAR = None  # torch's F.linear, saved before DeepSpeed replaces it process-wide
sys.path.insert(0, str(REPO / "tests"))


def _recipe(args, act_ckpt: bool):
    from _dist_utils import tiny_recipe

    return tiny_recipe(
        precision=args.precision, micro_batch=args.batch,
        model={"embed_dim": 192, "depth": args.depth, "num_heads": 3, "drop_path_rate": 0.0,
               "activation_checkpointing": act_ckpt},
        crops={"global_size": args.global_size, "local_size": args.local_size, "num_local_crops": args.local_crops},
        loss={"num_prototypes": args.prototypes, "bottleneck_dim": 256, "head_hidden_dim": 2048},
        optim={"clip_mode": args.clip_mode, "clip_grad": 3.0},
        schedule={"epochs": 10, "iterations_per_epoch": 100},
    )


def _batches(args, n: int):
    import numpy as np
    import torch

    from dvtrain.data.collate import collate_multicrop

    g = torch.Generator().manual_seed(0)
    n_tokens = (args.global_size // 14) ** 2
    out = []
    for s in range(n):
        samples = [{"global_crops": [torch.randn(3, args.global_size, args.global_size, generator=g) for _ in range(2)],
                    "local_crops": [torch.randn(3, args.local_size, args.local_size, generator=g)
                                    for _ in range(args.local_crops)]} for _ in range(args.batch)]
        out.append(collate_multicrop(samples, n_tokens=n_tokens, generator=np.random.default_rng(s)))
    return out


PHASES = ("forward", "backward", "step", "ema", "total")


def build_variant(args, variant: str):
    """Build one variant; returns ``step(i, batch) -> dict phase -> seconds``."""
    import torch

    recipe = _recipe(args, args.act_ckpt)
    cuda = torch.cuda.is_available()

    if variant == "zero3":
        from dvtrain.train.param_groups import apply_schedule_to_param_groups
        from dvtrain.train.trainer import Trainer

        tr = Trainer(recipe)
        eng, model, sched = tr.engine, tr.model, tr.schedules

        def step(i, batch):
            sc = sched.at(i)
            t0 = time.perf_counter()
            apply_schedule_to_param_groups(eng.param_groups, sc["lr"], sc["wd"], sc["last_layer_lr"])
            losses = eng.forward(tr._to_device(batch), teacher_temp=sc["teacher_temp"])
            t1 = time.perf_counter()
            eng.backward(losses["total"])
            t2 = time.perf_counter()
            res = eng.step()
            model.apply_center_update()
            t3 = time.perf_counter()
            if res.applied:
                eng.update_teacher(sc["momentum"])
            t4 = time.perf_counter()
            return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)))
    else:
        import random

        import numpy as np

        from dvtrain.train.meta_arch import SSLMetaArch
        from dvtrain.train.param_groups import apply_schedule_to_param_groups
        from dvtrain.train.meta_arch import meta_arch_config_from_recipe
        from dvtrain.train.trainer import schedules_from_recipe

        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        model = SSLMetaArch(meta_arch_config_from_recipe(recipe))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        o = recipe.optim
        sched = schedules_from_recipe(recipe, 1)
        opt = torch.optim.AdamW(model.param_groups(o.layerwise_decay, o.patch_embed_lr_mult), lr=0.0,
                                betas=o.betas, eps=o.eps, weight_decay=0.0)
        model.train()
        autocast = torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=dtype != torch.float32)

        def step(i, batch):
            # DeepSpeed's ZeRO-3 (memory_efficient_linear) swaps torch.nn.functional.linear for its own
            # autograd function in the whole process; the plain baseline runs with torch's.
            ds_linear, torch.nn.functional.linear = torch.nn.functional.linear, _TORCH_LINEAR
            try:
                return _plain_step(i, batch)
            finally:
                torch.nn.functional.linear = ds_linear

        def _plain_step(i, batch):
            sc = sched.at(i)
            t0 = time.perf_counter()
            apply_schedule_to_param_groups(opt.param_groups, sc["lr"], sc["wd"], sc["last_layer_lr"])
            with autocast:
                losses = model(batch, teacher_temp=sc["teacher_temp"])
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            t2 = time.perf_counter()
            if o.clip_mode == "per_module":
                for sub in model.student.values():
                    torch.nn.utils.clip_grad_norm_(sub.parameters(), o.clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(model.student.parameters(), o.clip_grad)
            opt.step()
            model.apply_center_update()
            t3 = time.perf_counter()
            model.update_teacher(sc["momentum"])
            t4 = time.perf_counter()
            return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)))

    return step


def run_child(args) -> dict:
    """``--child pair``: plain and ZeRO-3 steps interleaved in one process (both see the same machine
    load), medians per phase. ``--child memory``: ZeRO-3 alone, peak memory growth during the steps."""
    global _TORCH_LINEAR
    import torch

    _TORCH_LINEAR = torch.nn.functional.linear
    torch.set_num_threads(args.threads)
    batches = _batches(args, args.warmup + args.steps)
    variants = ["plain", "zero3"] if args.child == "pair" else ["zero3"]
    steps = {v: build_variant(args, v) for v in variants}
    times: dict[str, dict[str, list[float]]] = {v: {k: [] for k in PHASES} for v in variants}
    for i in range(args.warmup):
        for v in variants:
            steps[v](i, batches[i])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    saved: dict[int, int] = {}

    def pack(t):  # every tensor autograd saves for backward (deduplicated by storage)
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i in range(args.warmup, args.warmup + args.steps):
        for v in variants:
            if args.child == "memory" and i == args.warmup:
                saved.clear()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    res = steps[v](i, batches[i])
            else:
                res = steps[v](i, batches[i])
            for k, val in res.items():
                times[v][k].append(val)
    mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else sum(saved.values()) / 2**20
    return {v: {"median_s": {k: statistics.median(x) for k, x in times[v].items()},
                "images_per_s": args.batch / statistics.median(times[v]["total"])} for v in variants} | {
        "peak_mem_growth_mib": mem, "act_ckpt": args.act_ckpt}


def _spawn(args, child: str, act_ckpt: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", child] + (["--act-ckpt"] if act_ckpt else [])
    for k in ("steps", "warmup", "batch", "depth", "global_size", "local_size", "local_crops", "prototypes",
              "precision", "clip_mode", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO), check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{child} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", choices=["pair", "memory"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--act-ckpt", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--global-size", type=int, default=112)
    p.add_argument("--local-size", type=int, default=56)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--prototypes", type=int, default=8192)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--clip-mode", default="per_module", choices=["per_module", "global"])
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    import deepspeed
    import torch

    pair = _spawn(args, "pair", False)
    mem = {a: _spawn(args, "memory", a) for a in (False, True)}
    lines = [
        "# Training step: ZeRO-3 engine vs plain torch (one process)",
        "",
        f"- host: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} torch threads; CUDA: {torch.cuda.is_available()}",
        f"- torch {torch.__version__}, deepspeed {deepspeed.__version__}, python {platform.python_version()}",
        f"- config: vit_tiny width 192, depth {args.depth}, patch 14, global {args.global_size}px x2, local "
        f"{args.local_size}px x{args.local_crops}, batch {args.batch}, DINO head 2048/256/{args.prototypes}, "
        f"iBOT shared head, KoLeo on, {args.precision}, clip {args.clip_mode}",
        f"- median over {args.steps} steps after {args.warmup} warm-up steps; plain and ZeRO-3 steps interleaved "
        "in one process so both see the same machine load",
        "",
        "| variant | images/s | total ms | forward ms | backward ms | step+clip+center ms | EMA ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in ("plain", "zero3"):
        m = pair[v]["median_s"]
        lines.append(f"| {v} | {pair[v]['images_per_s']:.2f} | {1e3 * m['total']:.1f} | {1e3 * m['forward']:.1f} | "
                     f"{1e3 * m['backward']:.1f} | {1e3 * m['step']:.1f} | {1e3 * m['ema']:.1f} |")
    ratio = pair["zero3"]["median_s"]["total"] / pair["plain"]["median_s"]["total"]
    lines += ["", f"ZeRO-3 / plain step time: **{ratio:.3f}** (overhead {100 * (ratio - 1):+.1f} %; goal <= +10 %).",
              "", "Activation checkpointing (ZeRO-3, separate processes). Memory: on CPU the bytes autograd keeps "
              "for backward in one step (saved tensors, deduplicated by storage; with checkpointing only block "
              "inputs are kept outside the recomputed region); on CUDA the peak allocated memory:", "",
              "| act. ckpt | images/s | activation memory MiB |", "|---|---|---|"]
    for a in (False, True):
        lines.append(f"| {'on' if a else 'off'} | {mem[a]['zero3']['images_per_s']:.2f} | "
                     f"{mem[a]['peak_mem_growth_mib']:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
