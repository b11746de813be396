"""The ``dvtrain`` command line (Typer). Thin: parse arguments, call the library, print results.

Every command turns a user error into one clear message on stderr and exit status 1, without a
traceback (:mod:`dvtrain.errors`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from dvtrain.errors import user_errors, warn
from dvtrain.recipe import derive, dump_recipe, load_recipe, resolve_ds_config

app = typer.Typer(
    name="dvtrain",
    help="Scale-out DINOv2 self-supervised pretraining (DeepSpeed ZeRO-3, Triton kernels, MDS streaming, W&B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console(highlight=False, soft_wrap=True)

SetOption = typer.Option(
    None, "--set", "-s", help="Override a recipe value: dotted.path=value (YAML), e.g. optim.base_lr=2e-4. Repeatable."
)


@app.command()
@user_errors
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = SetOption,
    world_size: int = typer.Option(1, "--world-size", "-w", help="Ranks the run will use (for derived values)."),
) -> None:
    """Validate a recipe; print a one-line summary, or every problem with its field path.

    The data location is checked too (a local MDS directory with index.json, or an object store with
    credentials and a reachable endpoint, as `dvtrain launch` checks it); a problem there is a warning,
    since the recipe may be validated on another machine than the one that trains.

    Example: dvtrain validate recipes/vitg14.yaml --set optim.base_lr=1e-4
    """
    from dvtrain.launch import check_data_location

    r = load_recipe(recipe, overrides or [])
    d = derive(r, world_size)
    resolve_ds_config(r, world_size)
    try:
        check_data_location(r.data.path)
    except ValueError as exc:
        warn(f"{exc}. `dvtrain launch` would stop here")
    from dvtrain.models.init_from import check_init_from

    check_init_from(r)
    from dvtrain.train.distill import teacher_temperature_advice

    advice = teacher_temperature_advice(r)  # the warning `dvtrain launch` gives
    if advice:
        warn(advice)
    out_console.print(
        f"ok {recipe}: {r.model.arch}/{r.model.patch_size} (ffn={r.model.ffn_layer}, "
        f"registers={r.model.num_register_tokens}), {r.precision} ZeRO-{r.zero.stage}, "
        f"global batch {d.global_batch} on {world_size} rank(s), lr {d.lr:.6g}, {d.total_iterations} iterations"
    )


@app.command()
@user_errors
def show(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = SetOption,
    world_size: int = typer.Option(1, "--world-size", "-w", help="Ranks the run will use (for derived values)."),
) -> None:
    """Print the resolved recipe (YAML), the derived values and the resolved DeepSpeed config (JSON).

    Example: dvtrain show recipes/vitl14.yaml --world-size 16
    """
    r = load_recipe(recipe, overrides or [])
    d = derive(r, world_size)
    ds = resolve_ds_config(r, world_size)
    out_console.print("# recipe", markup=False)
    out_console.print(dump_recipe(r), markup=False)
    out_console.print("# derived", markup=False)
    out_console.print(json.dumps(d.model_dump(), indent=2), markup=False)
    out_console.print("# deepspeed config", markup=False)
    out_console.print(json.dumps(ds, indent=2), markup=False)
    from dvtrain.flops import model_summary

    out_console.print(f"# networks (global batch {d.global_batch})", markup=False)
    for row in model_summary(r, world_size):
        out_console.print(f"{row['network']}: {row['parameters'] / 1e6:.3f}M parameters, "
                          f"{row['flops_per_step'] / 1e12:.4g} TFLOPs per step "
                          f"({row['flops_per_image'] / 1e9:.4g} GFLOPs per image)", markup=False)


bench_app = typer.Typer(help="Microbenchmarks (kernels against eager torch and torch.compile).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("kernels")
@user_errors
def bench_kernels(
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    quick: bool = typer.Option(False, "--quick", help="Small shapes and few repeats (a minute on a CPU)."),
    shapes: Optional[List[str]] = typer.Option(
        None, "--shape", help="Only shapes whose label contains this text (vit_large, B=4096, ...). Repeatable."),
) -> None:
    """Time the fused SwiGLU and KoLeo kernels against eager torch and torch.compile (forward, backward,
    full step, peak memory). Without a GPU only the references are timed.

    Example: dvtrain bench kernels --json benchmarks/results/kernels.json --shape vit_large --shape B=4096
    """
    from dvtrain.bench import run_kernel_bench

    run_kernel_bench(str(json_path) if json_path else None, quick=quick, select=shapes or None)


def _mount_subcommands() -> None:
    from dvtrain.data.commands import app as data_app
    from dvtrain.eval.commands import app as eval_app
    from dvtrain.export import export_command
    from dvtrain.viz import viz_app

    app.add_typer(data_app, name="data", help="Convert image folders to MDS shards; inspect and curate them.")
    app.add_typer(eval_app, name="eval", help="Evaluate a backbone: k-NN and linear probes.")
    app.add_typer(viz_app, name="viz", help="PCA feature maps and attention maps of a backbone.")
    app.command("export")(export_command)


_mount_subcommands()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def launch(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = SetOption,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run directory (default runs/<name>)."),
    resume: bool = typer.Option(False, "--resume", help="Resume from the run directory's latest checkpoint."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Ranks on this node (deepspeed launcher when > 1)."),
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", help="MPI-style hostfile for multi-node runs."),
    worker: bool = typer.Option(False, "--worker", hidden=True, help="Run as one rank of a launched job."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show DeepSpeed's INFO lines."),
) -> None:
    """Train: validate, then run in place (one process) or start every rank through DeepSpeed's launcher.

    Extra --dotted.path=value arguments (as a W&B sweep agent passes them) are recipe overrides.
    Relaunching the same command resumes exactly from the newest complete checkpoint. Exit status:
    0 done, 130/143 stopped by SIGINT/SIGTERM (a checkpoint was written), 1 diverged or failed.

    Example: dvtrain launch recipes/vitg14.yaml --hostfile hosts --set data.path=s3://bucket/mds
    """
    from dvtrain.launch import launch as run_launch

    code = run_launch(recipe, overrides or [], output_dir, resume, nproc, hostfile, worker, list(ctx.args), verbose)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def demo(
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run directory (default runs/demo-<time>)."),
    overrides: Optional[List[str]] = SetOption,
    nproc: int = typer.Option(1, "--nproc", help="Ranks (2 = the 2-process variant)."),
) -> None:
    """The main job: train recipes/smoke_cpu.yaml on the bundled Fashion-MNIST images (DeepSpeed ZeRO-3, bf16),
    then print the teacher's k-NN accuracy beside raw pixels and the randomly initialised network.

    Example: dvtrain demo --nproc 2
    """
    from dvtrain.demo import run_demo

    run_demo(output_dir, overrides or [], nproc)


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
