"""``dvtrain data`` commands: ``convert`` (images -> MDS shards), ``inspect`` (stats + PNG) and
``curate`` (the curation pipeline, :mod:`dvtrain.data.curate`).

Thin layer: parse options, call ``dvtrain.data.shards.convert_to_mds`` /
``dvtrain.data.inspect``, print a summary. User errors exit with code 1 and a one-line message
(:mod:`dvtrain.errors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dvtrain.errors import stopped, user_errors

__all__ = ["app"]

app = typer.Typer(help="Prepare and inspect training data (MDS shards for mosaicml-streaming).",
                  no_args_is_help=True, add_completion=False)
console = Console(soft_wrap=True)  # paths and skip reasons stay on one line


def _parse_label_names(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
@user_errors
def convert(
    src: Path = typer.Argument(..., help="Image folder (SRC/<class>/...), a path list (.txt/.csv: "
                               "'path [label]' per line), IDX (*-idx3-ubyte[.gz]) or .npy/.npz."),
    out: str = typer.Argument(..., help="Output directory, or an object-store URL (s3://, gs://, "
                              "...) that mosaicml-streaming can write to."),
    labels: str = typer.Option("auto", help="auto | from-folders | none"),
    labels_file: Optional[Path] = typer.Option(None, help="Labels of IDX/.npy images (IDX1, .npy "
                                               "or one integer per line). Default for IDX: the "
                                               "sibling *-labels-idx1-ubyte[.gz] file."),
    label_names: Optional[str] = typer.Option(None, help="Class names by label: 'a,b,c' or a file "
                                              "with one name per line (not for folders)."),
    max_side: Optional[int] = typer.Option(None, help="Resize images whose longer side exceeds "
                                           "this many pixels (re-encoded: JPEG q95 / PNG)."),
    workers: int = typer.Option(1, help="Decode/validate processes (output order unchanged)."),
    limit: Optional[int] = typer.Option(None, help="Convert only the first N source entries."),
    shard_size: str = typer.Option("64mb", help="Maximum shard size."),
    overwrite: bool = typer.Option(False, help="Replace an existing local OUT (after success)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Convert images to MDS shards + manifest.json; undecodable files are skipped and listed.

    16-bit images are scaled to 8 bit (x >> 8) and EXIF orientation is applied (both re-encoded and
    counted in the manifest), so the shards hold 8-bit, upright images.

    Example: dvtrain data convert data/fashion_mnist/train-images-idx3-ubyte.gz data/mds/fmnist_train
    """
    from dvtrain.data.shards import convert_to_mds

    report = convert_to_mds(src, out, labels=labels, labels_file=labels_file,
                            label_names=_parse_label_names(label_names), max_side=max_side,
                            workers=workers, limit=limit, size_limit=shard_size,
                            overwrite=overwrite, progress=progress)
    m = report.manifest
    console.print(f"wrote {m['num_samples']} samples to {report.out} "
                  f"({m['num_labels']} labels, formats {m['image_formats']}, "
                  f"{m['num_resized']} resized, {m['num_scaled_from_16bit']} scaled from 16 to 8 bit, "
                  f"{m['num_exif_transposed']} turned upright by their EXIF orientation)")
    if m["skipped"]:
        console.print(f"[yellow]skipped {m['num_skipped']} file(s):[/yellow]")
        for s in m["skipped"][:50]:
            console.print(f"  {s['path']}: {s['reason']}", markup=False, highlight=False)
        if m["num_skipped"] > 50:
            console.print(f"  ... and {m['num_skipped'] - 50} more (see manifest.json)")
    _print_other_files(m["other_files"])


def _print_other_files(other: dict[str, int]) -> None:
    """One console line for the files of a folder SRC that are not images by their extension."""
    from dvtrain.data.shards import other_files_text

    if other:
        console.print(f"[yellow]ignored {other_files_text(other)}[/yellow]", highlight=False)


@app.command()
@user_errors
def inspect(
    out: Path = typer.Argument(..., help="Local MDS dataset directory."),
    png: Optional[Path] = typer.Option(None, help="Write a contact sheet PNG here."),
    samples: int = typer.Option(16, help="Random samples on the contact sheet."),
    augmented: int = typer.Option(4, help="Samples shown with their multi-crop views."),
    global_size: int = typer.Option(224, help="Global crop size (px)."),
    local_size: int = typer.Option(96, help="Local crop size (px)."),
    local_crops: int = typer.Option(8, help="Local crops per image."),
    seed: int = typer.Option(0, help="Picks the samples and seeds the crops."),
    scan: bool = typer.Option(False, help="Recompute stats from the shards, not the manifest."),
) -> None:
    """Print sample count, label histogram and image sizes; optionally write a contact sheet.

    Example: dvtrain data inspect data/mds/fmnist_train --png sheet.png --global-size 28 --local-size 14
    """
    from dvtrain.data.inspect import contact_sheet, dataset_stats
    from dvtrain.data.shards import iter_label_names

    stats = dataset_stats(out, scan=scan)
    console.print(f"{out}: {stats['num_samples']} samples in {stats['num_shards']} shard(s)"
                  + (f", {stats['num_skipped']} skipped at conversion"
                     if stats["num_skipped"] is not None else ""))
    w, h = stats["width"], stats["height"]
    console.print(f"image width  px: min {w['min']}  median {w['median']}  mean {w['mean']}  "
                  f"max {w['max']}")
    console.print(f"image height px: min {h['min']}  median {h['median']}  mean {h['mean']}  "
                  f"max {h['max']}")
    table = Table("label", "name", "count", "share")
    total = max(1, stats["num_samples"])
    for label, name in iter_label_names(stats):
        count = int(stats["label_counts"][str(label)])
        table.add_row(str(label), name, str(count), f"{100.0 * count / total:.1f}%")
    console.print(table)
    if png is not None:
        sheet = contact_sheet(out, png, num_samples=samples, num_augmented=augmented,
                              global_size=global_size, local_size=local_size,
                              num_local_crops=local_crops, seed=seed)
        console.print(f"contact sheet {sheet['png']} ({sheet['size'][0]}x{sheet['size'][1]} px, "
                      f"samples {sheet['indices']})")


def _parse_clusters(value: str) -> Optional[list[int]]:
    if value.strip().lower() == "auto":
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--clusters must be 'auto' or comma-separated integers, finest level "
                         f"first (e.g. 1000,30); got {value!r}") from None


@app.command()
@user_errors
def curate(
    src: Path = typer.Argument(..., help="Image pool: a folder, a path list (.txt/.csv), IDX, "
                               ".npy/.npz, or a local MDS directory."),
    out: str = typer.Argument(..., help="Output MDS directory or object-store URL."),
    target_size: Optional[int] = typer.Option(None, help="Images to keep, balanced over "
                                              "hierarchical k-means clusters (Vo et al. 2024). "
                                              "Default: keep all that pass."),
    model: str = typer.Option("pixels", help="Embedding backbone: a run directory, training "
                              "checkpoint, `dvtrain export` output, HF directory or dinov2 hub "
                              "file; 'pixels' = 16x16 grayscale raw-pixel baseline."),
    image_size: int = typer.Option(224, help="Backbone input side (px): the shorter side is "
                                   "resized to it, then centre-cropped square."),
    against: Optional[Path] = typer.Option(None, help="Evaluation set (same kinds as SRC): pool "
                                           "images that duplicate one of its images are removed."),
    seed_set: Optional[Path] = typer.Option(None, help="Curated seed images: keep the "
                                            "--retrieve-k nearest pool images of each (DINOv2 "
                                            "retrieval); with --target-size, added to the sample."),
    retrieve_k: int = typer.Option(4, help="Pool images retrieved per seed image."),
    min_side: int = typer.Option(64, help="Reject images whose shorter side is below this (px)."),
    max_aspect: float = typer.Option(4.0, help="Reject images with longer/shorter side above this."),
    min_sharpness: float = typer.Option(20.0, help="Reject images whose variance of the Laplacian "
                                        "(grayscale 0..255) is below this (blurred)."),
    min_std: float = typer.Option(4.0, help="Reject near-constant images (grayscale std 0..255)."),
    phash_radius: int = typer.Option(4, help="Near duplicates: perceptual hashes within this many "
                                     "bits of 64 (negative: off)."),
    phash_cos: float = typer.Option(0.97, help="Near duplicates: embedding cosine that confirms a "
                                    "perceptual-hash match (> 1: no confirmation)."),
    near_cos: float = typer.Option(0.995, help="Near duplicates: embedding cosine similarity at or "
                                   "above this, hash or not (> 1: off). For a trained backbone "
                                   "lower it (about 0.95)."),
    crop_ncc: float = typer.Option(0.995, help="Cropped copies: normalised cross-correlation at "
                                   "or above this between an image and a crop box of another "
                                   "(> 1: off)."),
    crop_cos: float = typer.Option(0.93, help="Cropped copies: thumbnail cosine a candidate pair "
                                   "needs before it is verified."),
    clusters: str = typer.Option("auto", help="Clusters per k-means level, finest first "
                                 "(e.g. 1000,30); auto = sqrt(N), N^(1/4)."),
    resampling_steps: int = typer.Option(3, help="Resampling refits per k-means level."),
    kmeans_iters: int = typer.Option(20, help="Faiss k-means iterations per fit."),
    seed: int = typer.Option(0, help="Seed of k-means and sampling."),
    workers: int = typer.Option(1, help="Decoding processes."),
    batch_size: int = typer.Option(64, help="Embedding batch size."),
    work_dir: Optional[Path] = typer.Option(None, help="Stage results for resuming (default "
                                            "OUT.curate-work)."),
    shard_size: str = typer.Option("64mb", help="Maximum shard size."),
    overwrite: bool = typer.Option(False, help="Replace an existing local OUT (after success)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Curate an image pool: quality filters, exact and near deduplication (also against an
    evaluation set), embedding, balanced sampling and retrieval, then MDS shards +
    curation_report.json + curation_report.png. Interrupted runs resume after the last finished stage.

    Example: dvtrain data curate /data/crawl /data/mds/curated --target-size 1000000 --model runs/vits14 --against /data/mds/val --workers 8

    Under torchrun or the deepspeed launcher (WORLD_SIZE > 1) the ranks split the embedding; the work directory must be on a filesystem every rank sees.

    Example: torchrun --nproc_per_node 8 -m dvtrain data curate /data/crawl /data/mds/curated --model runs/vits14
    """
    from dvtrain.data.curate import CurateOptions, curate as run_curate
    from dvtrain.data.curate.pipeline import default_work_dir

    opts = CurateOptions(
        min_side=min_side, max_aspect=max_aspect, min_sharpness=min_sharpness, min_std=min_std,
        phash_radius=phash_radius, near_cos=None if near_cos > 1 else near_cos,
        phash_cos=None if phash_cos > 1 else phash_cos,
        crop_ncc=None if crop_ncc > 1 else crop_ncc, crop_cos=crop_cos,
        against=str(against) if against else None, model=model, image_size=image_size,
        batch_size=batch_size, target_size=target_size, clusters=_parse_clusters(clusters),
        resampling_steps=resampling_steps, kmeans_iters=kmeans_iters, seed=seed,
        seed_set=str(seed_set) if seed_set else None, retrieve_k=retrieve_k, workers=workers,
        shard_size=shard_size, work_dir=str(work_dir) if work_dir else None, overwrite=overwrite,
        progress=progress)
    stages: list[str] = []

    def on_stage(stage: str) -> None:
        stages.append(stage)
        console.print(f"[bold]stage {stage}[/bold]")

    def on_resume(stage: str) -> None:
        console.print(f"stage {stage}: finished in an earlier run, resumed")

    try:
        res = run_curate(src, out, opts, on_stage=on_stage, on_resume=on_resume)
    except KeyboardInterrupt:
        work = work_dir or default_work_dir(out)
        stopped(f"stopped (Ctrl-C) in stage {stages[-1] if stages else 'start-up'}; the stages that "
                f"finished are kept in {work}: run the same command again to continue after them")
    if res is None:  # a rank > 0 of a multi-process curation: rank 0 reports
        return
    c = res.report["counts"]
    if res.resumed:
        console.print(f"resumed: {', '.join(res.resumed)} (finished in {res.report['work_dir']})")
    console.print(f"source {c['source']} -> quality {c['after_quality']} -> exact "
                  f"{c['after_exact']} -> near {c['after_near']} -> sampled {c['after_sampling']}"
                  + (f" (+ retrieved {c['retrieved']})" if c["retrieved"] is not None else ""))
    _print_other_files(res.report["other_files"])
    console.print(f"wrote {c['selected']} samples to {res.out} (curation_report.json, "
                  f"curation_report.png)")
