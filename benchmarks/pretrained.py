"""Continued pretraining and distillation on the bundled Fashion-MNIST data (issue 13 acceptance).

Protocol (every run is `dvtrain launch` on the main job's recipe, k-NN of the exported teacher with the demo's
protocol: cosine, k = 20, T = 0.07, 10k-image bank, the 10k test split):

1. demo: `recipes/smoke_cpu.yaml` (450 iterations), or an existing demo run directory (`--demo`).
2. continued: the demo's run as `model.init_from` (backbone + heads of its teacher), 150 more iterations,
   (a) the same recipe and (b) the README's continue-without-forgetting settings (lower lr, slower teacher);
   against 150 iterations from scratch with the same recipe.
3. distillation: the half-width student `recipes/smoke_cpu_distill.yaml` distilled from the demo's run vs the
   same student (`recipes/smoke_cpu.yaml` at width 96) from scratch, each for the demo's training wall time:
   a 60-iteration calibration launch measures each one's images/s in this process's conditions, and the
   iteration count is set so that training takes the demo's training time (full schedules, no cut-off).
   The shared machine's speed drifts, so the report gives each run's training time over the demo's: read a
   pair as equal-time only when both are near 1.

Writes `<out>/results.json` and `benchmarks/results/2026-12-01-pretrained.md` (with `uptime` before and after).

    python benchmarks/pretrained.py --out runs/bench_pretrained [--demo runs/demo-...] [--quick]

`--quick` shrinks every run (4 iterations per epoch, 500-image bank) to check the plumbing in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
ITERS_PER_EPOCH = 50
BATCH = 64
#: iterations of the speed calibration launch; 30 mis-estimated the speed by up to 35 % on the shared machine
CALIBRATION_ITERS = 60


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def launch(recipe: Path, out: Path, sets: list[str]) -> dict:
    """One `dvtrain launch` in a subprocess; returns its summary.json (reused when already complete)."""
    if (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text()).get("status") == "done":
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "dvtrain", "launch", str(recipe), "-o", str(out), "--set", "wandb.mode=disabled"]
    for s in sets:
        cmd += ["--set", s]
    print("[bench]", " ".join(cmd), flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    if res.returncode != 0:
        raise SystemExit(f"launch failed ({res.returncode}): {' '.join(cmd)}")
    summary = json.loads((out / "summary.json").read_text())
    summary["command"] = " ".join(cmd)
    summary["launch_wall_s"] = time.time() - t0
    return summary


def top1(summary: dict) -> float | None:
    knn = summary.get("knn") or {}
    return (knn.get("per_k") or {}).get("20", {}).get("top1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_pretrained")
    ap.add_argument("--demo", type=Path, default=None, help="an existing demo run directory (skips step 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="continued,distill", help="comma-separated: continued, distill")
    ap.add_argument("--student", default="model.embed_dim=96",
                    help="comma-separated recipe overrides that make the student (both student runs)")
    ap.add_argument("--report", type=Path, default=REPO / "benchmarks" / "results" / "2026-12-01-pretrained.md",
                    help="markdown report to write")
    args = ap.parse_args()

    from dvtrain.demo import ensure_fashion_mnist_shards
    from dvtrain.recipe import load_recipe

    base = load_recipe(RECIPES / "smoke_cpu.yaml")
    ensure_fashion_mnist_shards(REPO / base.data.path, REPO / base.eval.val_path)
    ipe = 4 if args.quick else ITERS_PER_EPOCH
    common = [f"schedule.iterations_per_epoch={ipe}"] + (["eval.bank_size=500"] if args.quick else [])
    out = args.out
    uptime_before = _uptime()
    results: dict = {"uptime_before": uptime_before, "quick": args.quick}

    demo_dir = args.demo or out / "demo"
    demo = launch(RECIPES / "smoke_cpu.yaml", demo_dir, common) if args.demo is None else json.loads(
        (demo_dir / "summary.json").read_text())
    results["demo"] = {"top1": top1(demo), "iterations": demo["iterations"], "train_time_s": demo["train_time_s"]}
    three_epochs = ["schedule.epochs=3"]

    runs = {
        "continued_same_recipe": (RECIPES / "smoke_cpu.yaml", [f"model.init_from={demo_dir}", *three_epochs]),
        "continued_gentle": (RECIPES / "smoke_cpu.yaml", [
            f"model.init_from={demo_dir}", *three_epochs, "optim.base_lr=0.0005", "optim.warmup_epochs=0.2",
            "teacher.momentum_start=0.996", "optim.weight_decay=0.2", "optim.freeze_last_layer_epochs=0"]),
        "scratch_150": (RECIPES / "smoke_cpu.yaml", three_epochs),
    }
    parts = set(args.parts.split(","))
    if "continued" not in parts:
        runs = {}
    for name, (recipe, sets) in runs.items():
        s = launch(recipe, out / name, common + sets)
        results[name] = {"top1": top1(s), "iterations": s["iterations"], "train_time_s": s["train_time_s"],
                         "command": s.get("command")}

    target_s = demo["train_time_s"]
    student = [x for x in args.student.split(",") if x]
    students = {
        "student_distilled": (RECIPES / "smoke_cpu_distill.yaml", [f"distill.teacher={demo_dir}", *student]),
        "student_scratch": (RECIPES / "smoke_cpu.yaml", student),
    }
    if "distill" not in parts:
        students = {}
    for name, (recipe, sets) in students.items():
        calib = launch(recipe, out / f"{name}_calibration", common + sets + [
            f"schedule.epochs={CALIBRATION_ITERS / ipe:g}", "optim.warmup_epochs=0.1", "eval.train_path=null", "eval.val_path=null"])
        iters = max(int(round(target_s * calib["images_per_s"] / BATCH)), ipe)
        s = launch(recipe, out / name, common + sets + [f"schedule.epochs={iters / ipe:.4f}"])
        results[name] = {"top1": top1(s), "iterations": s["iterations"], "train_time_s": s["train_time_s"],
                         "calibration_images_per_s": calib["images_per_s"], "images_per_s": s["images_per_s"],
                         "command": s.get("command")}
    results["uptime_after"] = _uptime()
    (out / "results.json").write_text(json.dumps(results, indent=2))

    import torch

    lines = [
        "# Continued pretraining and distillation on the bundled data" + (" (--quick plumbing check)" if args.quick else ""),
        "",
        f"Command: `python benchmarks/pretrained.py --out {out} --parts {args.parts}{' --quick' if args.quick else ''}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        f"Machine load: before `{uptime_before}`, after `{results['uptime_after']}`.",
        "k-NN of the exported teacher (EMA), cosine, k = 20, T = 0.07, bank 10k (quick: 500), 10k test images.",
        "",
        "| run | iterations | training time (s) | time / demo's | k-NN top-1 |",
        "|---|---|---|---|---|",
    ]
    for name in ("demo", *runs, *students):
        r = results[name]
        lines.append(f"| {name} | {r['iterations']} | {r['train_time_s']:.0f} | {r['train_time_s'] / target_s:.2f} | "
                     f"{r['top1']} |")
    lines += ["", "Runs: " + ", ".join(f"`{results[n]['command']}`" for n in (*runs, *students))]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.report.write_text(text)


if __name__ == "__main__":
    main()
