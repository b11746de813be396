"""`dvtrain eval knn` and `dvtrain eval linear`: evaluate a checkpoint's backbone on MDS data.

Thin: load the backbone (`dvtrain.checkpoint.backbone.load_backbone`), build eval loaders over the
MDS directories (`dvtrain data convert` output), call `knn_eval_backbone` /
`linear_eval_backbone`, print, write JSON, optionally log to W&B.

Several processes (torchrun / `deepspeed` launcher environment, WORLD_SIZE > 1): each rank reads
its strided share of the data; features are gathered; rank 0 prints and writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from dvtrain.checkpoint.atomic import write_json_atomic
from dvtrain.errors import run_user_command

app = typer.Typer(
    name="eval",
    help="Evaluate a backbone: k-NN and linear probes (DINOv2 protocols).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _setup_device(device: Optional[str]):
    import torch

    from dvtrain import dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        info = dist.init_distributed()
        return info.device if device is None else torch.device(device)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


def log_to_wandb(
    results: dict[str, Any], project: str, mode: str, name: Optional[str], kind: str, config: dict[str, Any]
) -> None:
    """Log an eval result dict (flattened, numbers only, e.g. `knn/per_k/20/top1`) to a W&B run.

    Args:
        results: the eval dict. project: W&B project. mode: auto/online/offline/disabled
            (`dvtrain.logging.resolve_wandb_mode`). name: run name. kind: "knn" or "linear".
        config: run config (checkpoint, data paths, options).
    """
    import wandb

    from dvtrain.logging import resolve_wandb_mode

    run = wandb.init(
        project=project, name=name, mode=resolve_wandb_mode(mode), job_type=f"eval-{kind}", config=config, reinit=True
    )
    flat = _flatten(kind, results, {})
    run.log(flat)
    run.summary.update(flat)
    run.finish()


def _loaders(train: Path, val: Path, batch_size: int, image_size: int, resize_size: Optional[int], workers: int,
             limit_train: Optional[int], limit_val: Optional[int]):
    from dvtrain.eval.features import make_eval_loader

    return (
        make_eval_loader(train, batch_size, image_size, resize_size, workers, limit_train),
        make_eval_loader(val, batch_size, image_size, resize_size, workers, limit_val),
    )


def _finish(results: dict[str, Any], json_out: Optional[Path], wandb_project: Optional[str], wandb_mode: str,
            wandb_name: Optional[str], kind: str, config: dict[str, Any], text: str) -> None:
    from dvtrain import dist

    if not dist.is_main_process():
        return
    typer.echo(text)
    results = {**results, "config": config}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, results)
        typer.echo(f"wrote {json_out}")
    if wandb_project:
        log_to_wandb(results, wandb_project, wandb_mode, wandb_name, kind, config)


CHECKPOINT_HELP = "Training checkpoint dir, dvtrain export, HF dir or dinov2 hub .pth."
CheckpointOpt = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP)
TrainOpt = typer.Option(..., "--train", help="MDS directory of the labelled train set (dvtrain data convert).")
ValOpt = typer.Option(..., "--val", help="MDS directory of the labelled validation set.")
WhichOpt = typer.Option("teacher", "--which", help="teacher or student (training checkpoints).")
JsonOpt = typer.Option(None, "--json", help="Write the results to this JSON file.")
ImageSizeOpt = typer.Option(224, "--image-size", help="Centre-crop side in pixels (multiple of the patch size).")
ResizeOpt = typer.Option(None, "--resize-size", help="Shorter side before the crop; default image-size * 256/224.")
BatchOpt = typer.Option(64, "--batch-size", help="Images per forward pass.")
WorkersOpt = typer.Option(0, "--workers", help="DataLoader worker processes.")
LimitTrainOpt = typer.Option(None, "--limit-train", help="Use only the first N train samples.")
LimitValOpt = typer.Option(None, "--limit-val", help="Use only the first N validation samples.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...; default: this rank's accelerator.")
PrecisionOpt = typer.Option(
    "fp32", "--precision", help="Backbone forward: fp32, or bf16 / fp16 autocast (bf16: much faster on CPUs with bf16 units)."
)

_AUTOCAST = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def _autocast_dtype(precision: str):
    import torch

    if precision not in _AUTOCAST:
        raise ValueError(f"--precision must be one of {list(_AUTOCAST)}, got {precision!r}")
    name = _AUTOCAST[precision]
    return None if name is None else getattr(torch, name)
WandbProjectOpt = typer.Option(None, "--wandb-project", help="Log the results to this W&B project (off when not given).")
WandbModeOpt = typer.Option("auto", "--wandb-mode", help="auto (online with an API key), online, offline, disabled.")
WandbNameOpt = typer.Option(None, "--wandb-name", help="W&B run name.")


@app.command()
def knn(
    checkpoint: Path = CheckpointOpt,
    train: Path = TrainOpt,
    val: Path = ValOpt,
    json_out: Optional[Path] = JsonOpt,
    k: Optional[List[int]] = typer.Option(None, "--k", help="Neighbour count; repeatable. Default 10 20 100 200."),
    temperature: float = typer.Option(0.07, "--temperature", help="Softmax temperature of the vote weights."),
    which: str = WhichOpt,
    image_size: int = ImageSizeOpt,
    resize_size: Optional[int] = ResizeOpt,
    batch_size: int = BatchOpt,
    workers: int = WorkersOpt,
    limit_train: Optional[int] = LimitTrainOpt,
    limit_val: Optional[int] = LimitValOpt,
    device: Optional[str] = DeviceOpt,
    precision: str = PrecisionOpt,
    wandb_project: Optional[str] = WandbProjectOpt,
    wandb_mode: str = WandbModeOpt,
    wandb_name: Optional[str] = WandbNameOpt,
) -> None:
    """k-NN accuracy (top-1/top-5 per k) of the backbone's CLS features (dinov2/eval/knn.py).

    Example: dvtrain eval knn -c runs/s14/checkpoints --train data/fmnist-train --val data/fmnist-test --json knn.json
    """

    def _run() -> None:
        from dvtrain.checkpoint.backbone import load_backbone
        from dvtrain.eval.knn import DEFAULT_KS, format_knn_results, knn_eval_backbone

        dev = _setup_device(device)
        loaded = load_backbone(checkpoint, which=which, device=dev)
        train_dl, val_dl = _loaders(train, val, batch_size, image_size, resize_size, workers, limit_train, limit_val)
        results = knn_eval_backbone(
            loaded.model, train_dl, val_dl, ks=tuple(k or DEFAULT_KS), temperature=temperature, device=dev,
            autocast_dtype=_autocast_dtype(precision),
        )  # fmt: skip
        config = {"checkpoint": str(checkpoint), "which": which, "source_format": loaded.source_format,
                  "train": str(train), "val": str(val), "image_size": image_size, "precision": precision}  # fmt: skip
        _finish(results, json_out, wandb_project, wandb_mode, wandb_name, "knn", config, format_knn_results(results))

    run_user_command(_run)


@app.command()
def linear(
    checkpoint: Path = CheckpointOpt,
    train: Path = TrainOpt,
    val: Path = ValOpt,
    json_out: Optional[Path] = JsonOpt,
    lr: Optional[List[float]] = typer.Option(
        None, "--lr", help="Base learning rate of the grid; repeatable. Default: 1e-5 ... 0.1 (13)."
    ),
    n_last_blocks: Optional[List[int]] = typer.Option(
        None, "--n-last-blocks", help="CLS of the last n blocks; repeatable. Default 1 4."
    ),
    epochs: int = typer.Option(10, "--epochs", help="Passes over the cached train features."),
    probe_batch_size: int = typer.Option(256, "--probe-batch-size", help="Samples per SGD step (lr scales with it / 256)."),
    which: str = WhichOpt,
    image_size: int = ImageSizeOpt,
    resize_size: Optional[int] = ResizeOpt,
    batch_size: int = BatchOpt,
    workers: int = WorkersOpt,
    limit_train: Optional[int] = LimitTrainOpt,
    limit_val: Optional[int] = LimitValOpt,
    device: Optional[str] = DeviceOpt,
    precision: str = PrecisionOpt,
    seed: int = typer.Option(0, "--seed", help="Shuffling and head initialisation."),
    wandb_project: Optional[str] = WandbProjectOpt,
    wandb_mode: str = WandbModeOpt,
    wandb_name: Optional[str] = WandbNameOpt,
) -> None:
    """Linear probes on frozen features, a grid trained together; best chosen on val (dinov2/eval/linear.py).

    Example: dvtrain eval linear -c vits14.pth --train data/train --val data/val --json linear.json
    """

    def _run() -> None:
        from dvtrain.checkpoint.backbone import load_backbone
        from dvtrain.eval.linear import DEFAULT_LEARNING_RATES, DEFAULT_N_LAST_BLOCKS, linear_eval_backbone

        dev = _setup_device(device)
        loaded = load_backbone(checkpoint, which=which, device=dev)
        train_dl, val_dl = _loaders(train, val, batch_size, image_size, resize_size, workers, limit_train, limit_val)
        results = linear_eval_backbone(
            loaded.model, train_dl, val_dl,
            n_last_blocks_list=tuple(n_last_blocks or DEFAULT_N_LAST_BLOCKS),
            learning_rates=tuple(lr or DEFAULT_LEARNING_RATES),
            epochs=epochs, probe_batch_size=probe_batch_size, device=dev, seed=seed,
            autocast_dtype=_autocast_dtype(precision),
        )  # fmt: skip
        config = {"checkpoint": str(checkpoint), "which": which, "source_format": loaded.source_format,
                  "train": str(train), "val": str(val), "image_size": image_size, "precision": precision}  # fmt: skip
        n5 = results["top5_n"]
        lines = [f"{name}: top-1 {r['top1']:.2f}%  top-{n5} {r['top5']:.2f}%" for name, r in results["configs"].items()]
        lines.append(f"best on val: {results['best']['name']} top-1 {results['best']['top1']:.2f}%")
        text = "\n".join(lines + results["notes"])
        _finish(results, json_out, wandb_project, wandb_mode, wandb_name, "linear", config, text)

    run_user_command(_run)


__all__ = ["app", "knn", "linear", "log_to_wandb", "run_user_command"]
