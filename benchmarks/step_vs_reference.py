"""One DINOv2 training step: dvtrain (plain torch and DeepSpeed ZeRO-3) vs facebookresearch/dinov2's own code.

The reference is ``dinov2==0.0.1.dev2`` (PyPI; facebookresearch/dinov2's training code) run on CPU in fp32
through ``benchmarks/reference_xformers/`` (a plain-torch stand-in for the few xformers symbols it imports:
``memory_efficient_attention`` -> SDPA with the materialised ``BlockDiagonalMask``). It needs its own venv
(dinov2's pins want CUDA wheels), with this checkout importable in it:

    python benchmarks/step_vs_reference.py --setup /path/to/refvenv     # once (~5.5 GB), from the repo root
    OMP_NUM_THREADS=1 /path/to/refvenv/bin/python -W ignore benchmarks/step_vs_reference.py [--steps 20]

Configuration (the one of ``../shared/reference/refstep/step_ratio.py``): ViT-S/8, 2 global crops 32 px,
2 local crops 16 px, batch 4, separate DINO and iBOT heads (256 prototypes, hidden 128, bottleneck 64),
KoLeo 0.1, drop path 0.1, Sinkhorn-Knopp, fp32, 1 torch thread. One full training step per variant, the
same batch for every variant at each step index, steps interleaved (ref, plain, ..., ref, plain, ...):

- ``ref``   : dinov2 ``SSLMetaArch.forward_backward`` + ``clip_grad_norm_(3.0)`` per student sub-module +
              ``AdamW(foreach=True)`` on its parameter groups + EMA (``_foreach_mul_``/``_foreach_add_``).
- ``plain`` : dvtrain ``SSLMetaArch`` (packed multi-crop forward) + backward + per-module clipping +
              ``AdamW(foreach=True)`` (the reference's optimizer: isolates model + losses) + centers + EMA.
- ``plain_fused``: the same with ``AdamW(fused=True)``, the optimizer dvtrain's engine builds.
- ``plain_per_crop``: ``plain`` with the pre-issue-15 per-crop-batch backbone forward (baseline in-process).
- ``zero3`` : dvtrain's ``Trainer.train_step`` (DeepSpeed ZeRO-3, 1 process, gloo; leaf blocks, fused AdamW).
- ``zero3_compile``: ``zero3`` with ``model.compile=true`` (inductor; compile time is in the warm-up).

DeepSpeed ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide; the non-DeepSpeed variants run with
torch's own (swapped in around each step). Prints hardware, versions, load, per-variant medians and the
ratios against the issue-15 goals.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "benchmarks" / "reference_xformers"

GLOBAL, LOCAL, PATCH, NLOCAL, BATCH = 32, 16, 8, 2, 4
HEAD = dict(n_prototypes=256, hidden_dim=128, bottleneck_dim=64)
LR, WD, CLIP, MOM, TT = 1e-4, 0.04, 3.0, 0.994, 0.07
GOALS = {"plain": 0.75, "plain_fused": 0.75, "zero3": 0.85, "zero3_compile": 0.85}


def setup_venv(refvenv: Path) -> None:
    """Build the reference venv (same steps as ../shared/reference/refstep/setup_refvenv.sh) and make this
    checkout importable in it: the checkout, its .venv site-packages, every path that .venv's own .pth
    files add (a venv chained onto a shared one), and the editable finder of dvtrain."""
    py = REPO / ".venv" / "bin" / "python"
    if not py.exists():
        sys.exit("run from a checkout with a set-up .venv (make setup)")
    run = partial(subprocess.run, check=True)
    run([sys.executable, "-m", "venv", str(refvenv)])
    pip = [str(refvenv / "bin" / "pip"), "install", "--quiet"]
    run(pip + ["torch==2.14.1", "torchvision==0.29.1"])
    run(pip + ["omegaconf", "fvcore", "iopath"])
    run(pip + ["--no-deps", "dinov2==0.0.1.dev2"])
    site = lambda p: subprocess.run([str(p), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],  # noqa: E731
                                    check=True, capture_output=True, text=True).stdout.strip()
    proj_sp, ref_sp = Path(site(py)), Path(site(refvenv / "bin" / "python"))
    lines = [str(REPO), str(proj_sp)]
    for pth in sorted(proj_sp.glob("*.pth")):
        for ln in pth.read_text().splitlines():
            if ln.startswith("import ") or (ln.strip() and Path(ln.strip()).is_dir() and not ln.startswith("#")):
                lines.append(ln.strip())
    (ref_sp / "zz_project.pth").write_text("\n".join(dict.fromkeys(lines)) + "\n")
    run([str(refvenv / "bin" / "python"), "-W", "ignore", "-c",
         "import dinov2, dvtrain, deepspeed; print('ok: dinov2', dinov2.__file__, 'dvtrain', dvtrain.__file__)"])


# ---------------------------------------------------------------------------------------------- batches
def make_batches(n):
    import torch
    from dinov2.data import MaskingGenerator, collate_data_and_cast

    random.seed(0)
    g = torch.Generator().manual_seed(0)
    n_tok = (GLOBAL // PATCH) ** 2
    mg = MaskingGenerator(input_size=(GLOBAL // PATCH,) * 2, max_num_patches=0.5 * n_tok)
    collate = partial(collate_data_and_cast, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens=n_tok,
                      mask_generator=mg, dtype=torch.float32)
    return [collate([({"global_crops": [torch.randn(3, GLOBAL, GLOBAL, generator=g) for _ in range(2)],
                       "local_crops": [torch.randn(3, LOCAL, LOCAL, generator=g) for _ in range(NLOCAL)]}, ())
                     for _ in range(BATCH)]) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- variants
def build_ref(a):
    import dinov2.configs as dcfg
    import torch
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(dcfg.dinov2_default_config, OmegaConf.create({
        "compute_precision": {"grad_scaler": False},
        "student": {"arch": "vit_small", "patch_size": PATCH, "drop_path_rate": a.drop_path, "block_chunks": 0},
        "crops": {"global_crops_size": GLOBAL, "local_crops_size": LOCAL, "local_crops_number": NLOCAL},
        "dino": {"head_" + k: v for k, v in HEAD.items()} | {"koleo_loss_weight": 0.1},
        "ibot": {"head_" + k: v for k, v in HEAD.items()} | {"separate_head": True},
        "train": {"batch_size_per_gpu": BATCH, "centering": a.centering},
    }))
    torch.manual_seed(0)
    m = SSLMetaArch(cfg)
    m.train()
    m.need_to_synchronize_fsdp_streams = False
    for k in m.student:
        m.teacher[k].load_state_dict(m.student[k].state_dict())
    groups = m.get_params_groups()
    for g in groups:
        g["lr"], g["weight_decay"] = LR * g["lr_multiplier"], WD * g["wd_multiplier"]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), foreach=True)
    sp = [p for k in m.student for p in m.student[k].parameters()]
    tp = [p for k in m.student for p in m.teacher[k].parameters()]

    def step(batch):
        opt.zero_grad(set_to_none=True)
        m.forward_backward(batch, teacher_temp=TT)
        for v in m.student.values():
            torch.nn.utils.clip_grad_norm_(v.parameters(), CLIP)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(tp, MOM)
            torch._foreach_add_(tp, sp, alpha=1 - MOM)
    return step


def our_recipe(a, compile_blocks=False):
    from dvtrain.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"arch": "vit_small", "patch_size": PATCH, "drop_path_rate": a.drop_path, "compile": compile_blocks},
        "crops": {"global_size": GLOBAL, "local_size": LOCAL, "num_local_crops": NLOCAL},
        "loss": {"num_prototypes": HEAD["n_prototypes"], "head_hidden_dim": HEAD["hidden_dim"],
                 "bottleneck_dim": HEAD["bottleneck_dim"], "ibot_separate_head": True,
                 "ibot_num_prototypes": HEAD["n_prototypes"], "ibot_hidden_dim": HEAD["hidden_dim"],
                 "ibot_bottleneck_dim": HEAD["bottleneck_dim"], "centering": a.centering, "koleo_weight": 0.1},
        "optim": {"clip_mode": "per_module", "clip_grad": CLIP, "freeze_last_layer_epochs": 0},
        "schedule": {"epochs": 10, "iterations_per_epoch": 100},
        "batch": {"micro_batch_per_device": BATCH},
        "precision": "fp32",
        "zero": {"stage": 3},
        "wandb": {"mode": "disabled"},
    })


def build_plain(a, fused=False, packed=True):
    import torch

    from dvtrain.train.meta_arch import SSLMetaArch
    from dvtrain.train.meta_arch import meta_arch_config_from_recipe

    r = our_recipe(a)
    torch.manual_seed(0)
    m = SSLMetaArch(meta_arch_config_from_recipe(r))
    m.student.backbone.packed_multicrop = packed
    m.train()
    groups = m.param_groups(r.optim.layerwise_decay, r.optim.patch_embed_lr_mult)
    for g in groups:
        g.pop("names", None)
        g["lr"], g["weight_decay"] = LR * g.get("lr_multiplier", 1.0), WD * g.get("wd_multiplier", 1.0)
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), **({"fused": True} if fused else {"foreach": True}))

    def step(batch):
        opt.zero_grad(set_to_none=True)
        losses = m(batch, teacher_temp=TT)
        losses["total"].backward()
        for sub in m.student.values():
            torch.nn.utils.clip_grad_norm_(sub.parameters(), CLIP)
        opt.step()
        m.apply_center_update()
        m.update_teacher(MOM)
    return step


def build_zero3(a, compile_blocks=False):
    import torch

    from dvtrain.train.param_groups import apply_schedule_to_param_groups
    from dvtrain.train.trainer import Trainer

    tr = Trainer(our_recipe(a, compile_blocks))
    torch.set_num_threads(1)
    eng, model = tr.engine, tr.model

    def step(batch):
        apply_schedule_to_param_groups(eng.param_groups, LR, WD, LR)
        losses = eng.forward(tr._to_device(batch), teacher_temp=TT)
        eng.backward(losses["total"])
        res = eng.step()
        model.apply_center_update()
        if res.applied:
            eng.update_teacher(MOM)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", type=Path, default=None, help="build the reference venv at this path and exit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--centering", default="sinkhorn_knopp", choices=["sinkhorn_knopp", "centering"])
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--variants", default="ref,plain,plain_fused,plain_per_crop,zero3,zero3_compile")
    a = ap.parse_args()
    if a.setup is not None:
        setup_venv(a.setup.resolve())
        return

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(STANDIN))  # the xformers stand-in, before any installed xformers
    import torch

    torch.Tensor.cuda = lambda self, *args, **kw: self  # the reference hard-codes .cuda(non_blocking=True)
    torch_linear = torch.nn.functional.linear  # before DeepSpeed swaps it
    try:
        import dinov2  # noqa: F401
        import dvtrain
    except ImportError as exc:
        sys.exit(f"{exc}: run under the reference venv (python benchmarks/step_vs_reference.py --setup DIR)")
    import deepspeed

    from dvtrain.dist import init_distributed

    init_distributed(set_threads=False)
    torch.set_num_threads(1)
    names = a.variants.split(",")
    builders = {
        "ref": lambda: build_ref(a), "plain": lambda: build_plain(a),
        "plain_fused": lambda: build_plain(a, fused=True), "plain_per_crop": lambda: build_plain(a, packed=False),
        "zero3": lambda: build_zero3(a), "zero3_compile": lambda: build_zero3(a, compile_blocks=True),
    }
    unknown = [n for n in names if n not in builders]
    if unknown or "ref" not in names:
        sys.exit(f"--variants: unknown {unknown} (valid: {', '.join(builders)}); 'ref' is required")

    def with_torch_linear(fn):
        def run(batch):
            saved, torch.nn.functional.linear = torch.nn.functional.linear, torch_linear
            try:
                fn(batch)
            finally:
                torch.nn.functional.linear = saved
        return run

    variants = {n: (builders[n]() if n.startswith("zero3") else with_torch_linear(builders[n]())) for n in names}
    torch.set_num_threads(1)
    batches = make_batches(a.warmup + a.steps)
    clone = lambda b: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}  # noqa: E731
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(a.warmup + a.steps):
        for n, fn in variants.items():
            t0 = time.perf_counter()
            fn(clone(batches[i]))
            if i >= a.warmup:
                times[n].append(time.perf_counter() - t0)
    load1 = os.getloadavg()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# step vs reference: {platform.node()}, {cpu}, {os.cpu_count()} cpus, torch threads "
          f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}, dvtrain {Path(dvtrain.__file__).parent}")
    print(f"# ViT-S/8, 32 px x2 + 16 px x{NLOCAL}, batch {BATCH}, fp32, {a.centering}, drop path {a.drop_path}; "
          f"{a.steps} timed steps after {a.warmup} warm-up, interleaved {' '.join(names)}; load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after")
    med = {n: statistics.median(t) for n, t in times.items()}
    print("| variant | median ms | min ms | max ms | / ref | goal |")
    print("|---|---|---|---|---|---|")
    for n in names:
        q = sorted(times[n])
        goal = GOALS.get(n)
        verdict = "" if goal is None else f"<= {goal} {'met' if med[n] / med['ref'] <= goal else 'NOT met'}"
        print(f"| {n} | {1e3 * med[n]:.1f} | {1e3 * q[0]:.1f} | {1e3 * q[-1]:.1f} | {med[n] / med['ref']:.3f} | "
              f"{verdict} |")
    if "zero3" in med and "plain_fused" in med:
        print(f"zero3 / plain_fused = {med['zero3'] / med['plain_fused']:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
