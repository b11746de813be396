"""The main job (``make demo`` = ``dvtrain demo``): real DINOv2 training on real images, on a CPU.

1. Convert the bundled Fashion-MNIST subset (``data/fashion_mnist``: 20k train, 10k test) to MDS shards
   (skipped when already converted).
2. ``dvtrain launch recipes/smoke_cpu.yaml``: a ViT with registers and SwiGLU, DeepSpeed ZeRO-3, bf16.
3. k-NN (cosine, k = 20, T = 0.07, a 10k-image train bank, the 10k test split) of the trained teacher,
   beside two baselines computed the same way: raw pixels and the randomly initialised network.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from dvtrain.checkpoint.atomic import write_json_atomic
from dvtrain.recipe import REPO_ROOT, load_recipe

FMNIST = REPO_ROOT / "data" / "fashion_mnist"


def ensure_fashion_mnist_shards(train_out: Path, test_out: Path) -> None:
    """Convert the bundled IDX files to MDS shards unless ``index.json`` already exists there."""
    from dvtrain.data.shards import convert_to_mds

    names = (FMNIST / "classes.txt").read_text().split("\n")
    names = [n for n in names if n.strip()]
    for src, out in (("train-images-idx3-ubyte.gz", train_out), ("t10k-images-idx3-ubyte.gz", test_out)):
        if (out / "index.json").is_file():
            continue
        report = convert_to_mds(FMNIST / src, out, label_names=names, progress=False)
        print(f"[demo] converted {src} -> {out} ({report.manifest['num_samples']} images)", flush=True)


def baselines(recipe, bank_size: int) -> dict[str, float]:
    """k-NN top-1 (%) of raw pixels and of the randomly initialised backbone, same protocol as the teacher."""
    from dvtrain.checkpoint.backbone import backbone_from_recipe
    from dvtrain.data.fashion_mnist import load_fashion_mnist
    from dvtrain.eval.features import make_eval_loader
    from dvtrain.eval.knn import knn_eval_backbone, knn_eval_features
    from dvtrain.models.vit import build_backbone
    from dvtrain.train.meta_arch import meta_arch_config_from_recipe

    e = recipe.eval
    k = e.ks[0]
    xtr, ytr = load_fashion_mnist("train", limit=bank_size)
    xte, yte = load_fashion_mnist("test")
    raw = knn_eval_features(torch.from_numpy(xtr).flatten(1).float(), torch.from_numpy(ytr),
                            torch.from_numpy(xte).flatten(1).float(), torch.from_numpy(yte), ks=[k],
                            temperature=e.temperature)
    torch.manual_seed(recipe.seed)
    cfg = meta_arch_config_from_recipe(recipe)
    random_model = build_backbone(cfg.arch, **cfg.backbone_overrides)
    random_model = backbone_from_recipe(recipe, random_model.state_dict())
    size = e.image_size or recipe.crops.global_size
    train = make_eval_loader(e.train_path, batch_size=256, crop_size=size, resize_size=size, limit=bank_size)
    val = make_eval_loader(e.val_path, batch_size=256, crop_size=size, resize_size=size)
    rnd = knn_eval_backbone(random_model, train, val, ks=[k], temperature=e.temperature,
                            autocast_dtype=torch.bfloat16 if recipe.precision == "bf16" else None)
    return {"raw_pixels": raw["per_k"][str(k)]["top1"], "random_init": rnd["per_k"][str(k)]["top1"]}


def run_demo(output_dir: Path | None = None, overrides: list[str] = (), nproc: int = 1) -> dict:
    """Run the main job and print the three accuracies; returns them with the training summary."""
    from dvtrain.launch import launch

    recipe_path = REPO_ROOT / "recipes" / "smoke_cpu.yaml"
    recipe = load_recipe(recipe_path, list(overrides))
    ensure_fashion_mnist_shards(REPO_ROOT / recipe.data.path, REPO_ROOT / recipe.eval.val_path)
    run_dir = output_dir or REPO_ROOT / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    code = launch(recipe_path, list(overrides), run_dir, resume=False, nproc=nproc, hostfile=None, worker=False)
    if code != 0:
        raise SystemExit(code)
    result = json.loads((Path(run_dir) / "summary.json").read_text())
    k = recipe.eval.ks[0]
    teacher = result["knn"]["per_k"][str(k)]["top1"]
    base = baselines(recipe, recipe.eval.bank_size or 10000)
    report = {
        "teacher_knn_top1": teacher,
        "raw_pixels_knn_top1": base["raw_pixels"],
        "random_init_knn_top1": base["random_init"],
        "images_per_s": result["images_per_s"],
        "wall_time_s": result["wall_time_s"],
        "iterations": result["iterations"],
        "final_losses": result["final_losses"],
        "run_dir": str(run_dir),
    }
    write_json_atomic(Path(run_dir) / "demo_report.json", report)
    print("\nFashion-MNIST k-NN (k=%d, T=%g, %d-image bank, 10k test images), top-1:" % (
        k, recipe.eval.temperature, recipe.eval.bank_size or 10000))
    print(f"  dvtrain teacher ({result['iterations']} iterations, {result['wall_time_s'] / 60:.1f} min): {teacher:6.2f} %")
    print(f"  raw pixels:                           {base['raw_pixels']:6.2f} %")
    print(f"  randomly initialised network:         {base['random_init']:6.2f} %")
    print(f"  training: {result['images_per_s']:.1f} images/s over {result['train_time_s']:.0f} s "
          f"({result['wall_time_s']:.0f} s with start-up and evaluation); run directory {run_dir}")
    sys.stdout.flush()
    return report
