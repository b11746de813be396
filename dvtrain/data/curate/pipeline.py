"""``dvtrain data curate``: the driver that runs the curation stages and writes the result.

Stages, in order (each resumable; see below):

1. ``quality``  decode every image once (``--workers`` processes), measure it, reject the broken,
   tiny, extreme-aspect, near-constant and blurred ones (:mod:`.quality`); the same decode
   writes the crop descriptors of :mod:`.crops`;
2. ``exact``    identical file bytes or decoded pixels (:mod:`.dedup`);
3. ``embed``    one fp16 embedding per remaining image into a memmap (:mod:`.embed`); split
   over the processes when launched with several ranks (below);
4. ``near``     perceptual-hash, embedding and cropped-copy near duplicates, and duplicates of
   ``--against`` (by hash and embedding)
   (:mod:`.dedup`); runs after ``embed`` because it needs the embeddings;
5. ``cluster``  hierarchical k-means with resampling and balanced sampling to ``--target-size``
   (:mod:`.cluster`);
6. ``retrieve`` the k nearest pool images of each ``--seed-set`` image;
7. ``write``    MDS shards with the columns ``dvtrain data convert`` writes (``image`` bytes as
   found, ``label``, ``key``) + ``manifest.json`` + ``curation_report.json`` + ``curation_report.png``
   (:mod:`.report`).

Resume: intermediate results live in a work directory (``--work-dir``, default ``OUT.curate-work``
beside a local OUT). ``state.json`` there records each finished stage with a fingerprint of the
options that stage and the stages before it depend on; a rerun skips every stage whose fingerprint
still matches and recomputes from the first that changed (or never finished). The work directory
is kept after success (a rerun with a different ``--target-size`` only redoes clustering and
writing); delete it when done. OUT itself is written to ``OUT.tmp-<pid>`` and renamed at the end,
so an existing OUT is never half-overwritten.

Several ranks (``torchrun --nproc_per_node 8 -m dvtrain data curate ...`` or the ``deepspeed``
launcher: ``WORLD_SIZE`` > 1): the embed stage is split. Rank 0 creates the memmap, then sends
every rank (itself included) a contiguous slice of whole batches; each embeds its slice on
``cuda:LOCAL_RANK`` (CPU without CUDA) into the one file, opened ``r+``; after a barrier rank 0
records the stage as finished. Every other stage, ``state.json``, the console lines and the progress
bars are rank 0's; the other ranks wait (gloo group, :class:`_Ranks`) and exit 0 when rank 0 is
done or has stopped on an error (rank 0 prints it and exits 1). Every rank embeds the batches one
process would, so the embeddings equal a one-process run's (bit-identical with ``pixels``; with a
backbone up to rounding, as another device or thread count gives) and the stage fingerprints do not
depend on the number of ranks: 1- and N-process runs resume each other's stages. The work
directory must be on a filesystem every rank sees; one node is what is tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dvtrain import dist
from dvtrain import installed_version
from dvtrain.checkpoint.atomic import write_json_atomic
from dvtrain.data import shards
from dvtrain.data.curate import cluster as cl
from dvtrain.data.curate import crops, dedup
from dvtrain.data.curate.embed import (Embedder, check_model, create_embeddings_file, embed_rows,
                                       make_embedder, write_embeddings)
from dvtrain.data.curate.pool import Pool, encoded_bytes, list_pool
from dvtrain.data.curate.quality import QualityThresholds, quality_reason, scan_images

__all__ = ["CurateOptions", "CurateResult", "curate", "STAGES"]

STAGES = ("quality", "exact", "embed", "near", "cluster", "retrieve", "write")
REPORT_JSON = "curation_report.json"
REPORT_PNG = "curation_report.png"
STATE_VERSION = 1


@dataclass
class CurateOptions:
    """Options of a curation run (the CLI's flags; units in the field names or comments).

    ``near_cos`` None disables the embedding near-duplicate test; ``phash_radius`` < 0 disables
    the perceptual-hash one; ``crop_ncc`` None disables the cropped-copy test (:mod:`.crops`). ``clusters`` None = :func:`cluster.auto_cluster_counts`.
    """

    min_side: int = 64  # px
    max_aspect: float = 4.0
    min_sharpness: float = 20.0  # variance of the Laplacian, 0..255 grayscale
    min_std: float = 4.0  # grayscale std, 0..255
    phash_radius: int = 4  # bits of 64
    phash_cos: float | None = 0.97  # embedding cosine that confirms a hash match
    near_cos: float | None = 0.995  # embedding cosine alone
    crop_ncc: float | None = 0.995  # cropped copies: normalised cross-correlation (None: off)
    crop_cos: float = 0.93  # cropped copies: thumbnail cosine of a candidate pair
    against: str | None = None
    model: str = "pixels"
    image_size: int = 224  # px, backbone eval crop
    batch_size: int = 64
    target_size: int | None = None
    clusters: list[int] | None = None
    resampling_steps: int = 3
    kmeans_iters: int = 20
    seed: int = 0
    seed_set: str | None = None
    retrieve_k: int = 4
    nprobe: int = 16
    workers: int = 1
    shard_size: str = "64mb"
    work_dir: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class CurateResult:
    """What a curation wrote: ``out``, the report dict, and the stages that were skipped (resumed)."""

    out: str
    report: dict[str, Any]
    resumed: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Work directory and state


class _Work:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.state_path = path / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        if self.state.get("version") != STATE_VERSION:
            self.state = {"version": STATE_VERSION, "stages": {}}

    def done(self, stage: str, fp: str) -> bool:
        s = self.state["stages"].get(stage)
        return bool(s and s["fingerprint"] == fp and (self.path / f"{stage}.json").is_file())

    def finish(self, stage: str, fp: str, result: dict[str, Any], seconds: float) -> None:
        result = dict(result, seconds=round(seconds, 3))
        write_json_atomic(self.path / f"{stage}.json", result)
        self.state["stages"][stage] = {"fingerprint": fp, "seconds": round(seconds, 3)}
        # later stages depend on this one: forget them
        for later in STAGES[STAGES.index(stage) + 1:]:
            self.state["stages"].pop(later, None)
        write_json_atomic(self.state_path, self.state)

    def load(self, stage: str) -> dict[str, Any]:
        return json.loads((self.path / f"{stage}.json").read_text())


def _fingerprint(prev: str, stage: str, values: dict[str, Any]) -> str:
    blob = json.dumps({"prev": prev, "stage": stage, **values}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def _bar(enabled: bool):
    return shards.progress_bar(enabled)


# ----------------------------------------------------------------------------------------------
# Checks before any expensive start-up


def _check_options(src: str, out: str, o: CurateOptions) -> None:
    if o.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {o.workers}")
    if o.min_side < 1 or o.max_aspect < 1 or o.min_sharpness < 0 or o.min_std < 0:
        raise ValueError("quality thresholds: --min-side >= 1, --max-aspect >= 1, --min-sharpness "
                         ">= 0 and --min-std >= 0 are required")
    if o.phash_radius > 32:
        raise ValueError(f"--phash-radius {o.phash_radius} bits of 64 would match unrelated images; "
                         f"use 0..32 (negative disables)")
    for name, v in (("--near-cos", o.near_cos), ("--phash-cos", o.phash_cos),
                    ("--crop-ncc", o.crop_ncc)):
        if v is not None and not -1.0 < v <= 1.0:
            raise ValueError(f"{name} must be in (-1, 1] (above 1: off), got {v}")
    if not -1.0 < o.crop_cos <= 1.0:
        raise ValueError(f"--crop-cos must be in (-1, 1], got {o.crop_cos}")
    if o.target_size is not None and o.target_size < 1:
        raise ValueError(f"--target-size must be >= 1, got {o.target_size}")
    if o.clusters is not None and (not o.clusters or any(k < 1 for k in o.clusters)
                                   or any(a < b for a, b in zip(o.clusters, o.clusters[1:]))):
        raise ValueError(f"--clusters must be positive counts per level, finest first and "
                         f"non-increasing (e.g. 1000,30), got {o.clusters}")
    if o.retrieve_k < 1:
        raise ValueError(f"--retrieve-k must be >= 1, got {o.retrieve_k}")
    if o.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {o.batch_size}")
    check_model(o.model)
    final = None if shards.is_remote(out) else Path(out).expanduser().absolute()
    if final is not None and final.exists() and not o.overwrite:
        raise ValueError(f"output {final} already exists; pass --overwrite to replace it")
    if Path(src).expanduser().absolute() == final:
        raise ValueError("OUT must differ from SRC")


def default_work_dir(out: str) -> Path:
    """Where a curation to ``out`` keeps its stage results without ``--work-dir``: ``OUT.curate-work``
    beside a local OUT, ``./<name>.curate-work`` for an object-store OUT."""
    if shards.is_remote(out):
        name = out.rstrip("/").rsplit("/", 1)[-1] or "out"
        return Path.cwd() / f"{name}.curate-work"
    p = Path(out).expanduser().absolute()
    return p.with_name(p.name + ".curate-work")


# ----------------------------------------------------------------------------------------------
# Several ranks: the embed stage is split, every other stage runs on rank 0

#: How long (s) a rank waits for rank 0 in one collective: the stages before and after embed run
#: on rank 0 alone and may take hours on a large pool.
RANK_WAIT_S = 24 * 3600.0


@dataclass
class _EmbedJob:
    """One rank's share of the embed stage: ``payloads`` go to rows ``start..`` of ``path``."""

    path: str
    start: int
    payloads: list[Any]
    model: str
    image_size: int
    batch_size: int


def _embed_jobs(payloads: list[Any], path: Path, o: CurateOptions, world_size: int) -> list[_EmbedJob]:
    """Split N rows into ``world_size`` contiguous slices of whole batches (rank r gets batches
    ``[r * B // W, (r + 1) * B // W)`` of the B batches), so every rank embeds exactly the batches
    one process would (the same rows, bit-identical for ``pixels``)."""
    n_batches = -(-len(payloads) // o.batch_size)
    jobs = []
    for r in range(world_size):
        lo = min(len(payloads), r * n_batches // world_size * o.batch_size)
        hi = min(len(payloads), (r + 1) * n_batches // world_size * o.batch_size)
        jobs.append(_EmbedJob(str(path), lo, payloads[lo:hi], o.model, o.image_size, o.batch_size))
    return jobs


class _Ranks:
    """The processes of a curation launched with ``WORLD_SIZE`` > 1 (torchrun, ``deepspeed``).

    A gloo group (:func:`dvtrain.dist.init_distributed`; barriers and small messages only, so CPU
    and GPU runs alike) in which rank 0 runs the pipeline and sends the others work: one
    :class:`_EmbedJob` each at the embed stage, then ``None`` when it is done (or failed). The
    work directory must be on a filesystem every rank sees (one node is what is tested).

    Attributes:
        rank, world_size: this process's place.
        device: ``cuda:<LOCAL_RANK>`` with CUDA, else CPU (where this rank embeds).
        embedding: rank 0 is between sending embed jobs and the barrier after them.
    """

    def __init__(self) -> None:
        info = dist.init_distributed(backend="gloo", timeout_s=RANK_WAIT_S)
        self.rank, self.world_size, self.device = info.rank, info.world_size, info.device
        self.embedding = False

    def send(self, items: list[Any]) -> Any:
        """Rank 0: give rank r ``items[r]``; returns rank 0's own."""
        import torch.distributed as torch_dist

        got: list[Any] = [None]
        torch_dist.scatter_object_list(got, items, src=0)
        return got[0]

    def receive(self) -> Any:
        """Ranks > 0: wait for rank 0's next :meth:`send`; returns this rank's item."""
        import torch.distributed as torch_dist

        got: list[Any] = [None]
        torch_dist.scatter_object_list(got, None, src=0)
        return got[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _serve_embed_jobs(ranks: _Ranks) -> None:
    """Ranks > 0: embed the slices rank 0 sends into its memmap until it sends ``None``."""
    embedder: Embedder | None = None
    while (job := ranks.receive()) is not None:
        if job.payloads:
            if embedder is None:
                embedder = make_embedder(job.model, job.image_size, str(ranks.device))
            embed_rows(embedder, job.payloads, job.path, job.start, job.batch_size)
        ranks.barrier()


# ----------------------------------------------------------------------------------------------
# The driver


def curate(src: str | os.PathLike, out: str | os.PathLike, options: CurateOptions | None = None,
           on_stage: Callable[[str], None] | None = None,
           on_resume: Callable[[str], None] | None = None) -> CurateResult | None:
    """Curate an image pool into MDS shards (see the module docstring for the stages).

    Args:
        src: image folder, path list, IDX/.npy/.npz, or a local MDS directory.
        out: output directory or object-store URL (as for ``dvtrain data convert``).
        options: :class:`CurateOptions`.
        on_stage: called with a stage's name just before it runs (not when it is resumed).
        on_resume: called with a stage's name when its result is taken from the work directory.

    Several processes: launched with ``WORLD_SIZE`` > 1 (torchrun, the ``deepspeed`` launcher;
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set), every rank calls this with the
    same arguments; the embed stage is split over the ranks (see the module docstring), every
    other stage, the console and the progress bars are rank 0's.

    Returns:
        CurateResult with the report written to ``OUT/curation_report.json``; None on ranks > 0.

    Raises:
        ValueError: bad options, an unreadable source / evaluation / seed set, a model that cannot
            load, ``--target-size`` above the images left, or nothing left to write. Stages that
            finished stay in the work directory, so a corrected rerun resumes after them.
            Under several ranks only rank 0 raises them; the other ranks return None.
    """
    o = options or CurateOptions()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _curate(str(src), str(out), o, on_stage, on_resume, None)
    ranks = _Ranks()
    try:
        if ranks.rank != 0:
            _serve_embed_jobs(ranks)
            return None
        try:
            return _curate(str(src), str(out), o, on_stage, on_resume, ranks)
        finally:
            # success or error: release the other ranks (they exit 0; rank 0 reports an error).
            # A failure inside the embed exchange is left to the launcher, which stops them all.
            if not ranks.embedding:
                ranks.send([None] * ranks.world_size)
    finally:
        ranks.close()


def _curate(src: str, out: str, o: CurateOptions, on_stage: Callable[[str], None] | None,
            on_resume: Callable[[str], None] | None,
            ranks: _Ranks | None) -> CurateResult:
    """:func:`curate` on rank 0 (or in the only process): every stage; ``ranks`` splits the
    embed stage over the launched processes."""
    t_start = time.time()
    _check_options(src, out, o)
    pool = list_pool(src)
    against = list_pool(o.against, "--against") if o.against else None
    seeds = list_pool(o.seed_set, "--seed-set") if o.seed_set else None
    # a model that cannot load fails here, first
    embedder = make_embedder(o.model, o.image_size, str(ranks.device) if ranks else None)
    work = _Work(Path(o.work_dir).expanduser() if o.work_dir else default_work_dir(out))
    n = len(pool)
    resumed: list[str] = []
    removed: list[dict[str, Any]] = [dict(r, stage="quality", duplicate_of=None)
                                     for r in pool.pre_skipped]
    timings: dict[str, float] = {}
    fp = _fingerprint("", "pool", {"src": str(Path(src).expanduser().absolute()), "n": n,
                                   "keys": hashlib.sha1("\n".join(pool.keys).encode()).hexdigest()})

    def get_embedder():
        return embedder

    def run(stage: str, values: dict[str, Any], body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        nonlocal fp
        fp = _fingerprint(fp, stage, values)
        if work.done(stage, fp):
            resumed.append(stage)
            if on_resume:
                on_resume(stage)
            res = work.load(stage)
        else:
            if on_stage:
                on_stage(stage)
            t0 = time.time()
            res = body()
            work.finish(stage, fp, res, time.time() - t0)
            res = work.load(stage)
        timings[stage] = res["seconds"]
        removed.extend(res.get("removed", []))
        return res

    # 1. quality ------------------------------------------------------------------------------
    thresholds = QualityThresholds(o.min_side, o.max_aspect, o.min_sharpness, o.min_std)

    with_crops = o.crop_ncc is not None

    def quality() -> dict[str, Any]:
        recs = []
        crop_desc = (np.lib.format.open_memmap(work.path / "crops.npy", mode="w+", dtype=np.float16,
                                               shape=(n, len(crops.BOXES), crops.THUMB_SIDE ** 2))
                     if with_crops else None)
        with _bar(o.progress) as bar:
            job = bar.add_task("quality", total=n, skipped=0)
            bad = 0
            for i, rec in enumerate(scan_images([pool.payload(i) for i in range(n)], o.workers,
                                                with_crops=with_crops)):
                if "crop_desc" in rec:
                    crop_desc[i] = rec.pop("crop_desc")
                recs.append(rec)
                bad += quality_reason(rec, thresholds) is not None
                bar.update(job, advance=1, skipped=bad)
        alive, rem, stats = [], [], []
        for i, rec in enumerate(recs):
            why = quality_reason(rec, thresholds)
            if why is None:
                alive.append(i)
                stats.append(rec)
            else:
                rem.append({"path": pool.keys[i], "stage": "quality", "reason": why,
                            "duplicate_of": None})
        np.savez(work.path / "quality.npz", alive=np.asarray(alive, np.int64),
                 width=np.asarray([r["width"] for r in stats], np.int64),
                 height=np.asarray([r["height"] for r in stats], np.int64),
                 lossy=np.asarray([r["lossy"] for r in stats], bool),
                 sharpness=np.asarray([r["sharpness"] for r in stats], np.float64),
                 file_hash=np.asarray([r["file_hash"] for r in stats], "U40"),
                 pixel_hash=np.asarray([r["pixel_hash"] for r in stats], "U40"),
                 phash=np.asarray([r["phash"] for r in stats], "U16"))
        if crop_desc is not None:
            crop_desc.flush()
        return {"removed": rem, "kept": len(alive)}

    run("quality", dict(asdict(thresholds), crop_descriptors=with_crops), quality)
    q = dict(np.load(work.path / "quality.npz"))
    if len(q["alive"]) == 0:
        raise ValueError(_empty_message(pool, removed, "quality"))

    # 2. exact duplicates ------------------------------------------------------------------------
    def exact() -> dict[str, Any]:
        dups = dedup.exact_duplicates(q["file_hash"].tolist(), q["pixel_hash"].tolist())
        gone = {i for i, _, _ in dups}
        rem = [{"path": pool.keys[q["alive"][i]], "stage": "exact", "reason": why,
                "duplicate_of": pool.keys[q["alive"][k]]} for i, k, why in dups]
        keep = np.asarray([j for j in range(len(q["alive"])) if j not in gone], np.int64)
        np.save(work.path / "exact_keep.npy", keep)  # positions into the quality arrays
        return {"removed": rem, "kept": len(keep)}

    run("exact", {}, exact)
    keep_q = np.load(work.path / "exact_keep.npy")
    alive = q["alive"][keep_q]

    # 3. embed -----------------------------------------------------------------------------------
    emb_path = work.path / "embeddings.npy"

    def embed() -> dict[str, Any]:
        e = get_embedder()
        payloads = [pool.payload(int(i)) for i in alive]
        with _bar(o.progress) as bar:
            if ranks is None:
                job = bar.add_task("embed", total=len(alive), skipped=0)
                write_embeddings(e, payloads, emb_path, o.batch_size,
                                 on_batch=lambda done: bar.update(job, completed=done))
            else:  # rank 0 creates the file, then every rank fills its slice; rank 0's bar
                create_embeddings_file(emb_path, len(payloads), e.dim)
                ranks.embedding = True
                mine = ranks.send(_embed_jobs(payloads, emb_path, o, ranks.world_size))
                job = bar.add_task(f"embed (rank 0 of {ranks.world_size})",
                                   total=len(mine.payloads), skipped=0)
                embed_rows(e, mine.payloads, emb_path, mine.start, o.batch_size,
                           on_batch=lambda done: bar.update(job, completed=done))
                ranks.barrier()  # every slice is written; run() then records the stage
                ranks.embedding = False
        return {"embedder": e.name, "dim": e.dim, "count": len(alive)}

    emb_res = run("embed", {"model": o.model, "image_size": o.image_size,
                            "model_mtime": _mtime(o.model)}, embed)
    emb = np.load(emb_path, mmap_mode="r")

    # 4. near duplicates (+ --against) -----------------------------------------------------------
    def near() -> dict[str, Any]:
        codes = dedup.phash_array(q["phash"][keep_q].tolist())
        area = (q["width"] * q["height"])[keep_q].astype(np.float64)
        sharp = q["sharpness"][keep_q]
        lossy = q["lossy"][keep_q] if "lossy" in q else None  # absent in a work dir from before it
        rem: list[dict[str, Any]] = []
        gone: set[int] = set()
        with _bar(o.progress) as bar:
            job = bar.add_task("near duplicates", total=2 if against else 1, skipped=0)
            pool_desc = ((np.load(work.path / "crops.npy", mmap_mode="r"), pool.payload)
                         if with_crops else None)
            crop_text = f"crop or rescaled copy, normalised cross-correlation >= {o.crop_ncc}"
            crop_jobs: dict[str, Any] = {}

            def crop_progress(label: str) -> Callable[[int, int], None]:
                def update(done: int, total: int) -> None:
                    if label not in crop_jobs:
                        crop_jobs[label] = bar.add_task(label, total=total, skipped=0)
                    bar.update(crop_jobs[label], completed=done)
                return update
            if against is not None:  # first, so that a pool copy of an eval image never stays
                a_codes, a_emb, a_desc, a_ok = _describe(against, get_embedder(), o)
                hits = dedup.against_duplicates(codes, emb, a_codes, a_emb, o.phash_radius,
                                                o.near_cos, o.phash_cos, o.nprobe)
                if pool_desc is not None:  # pool images that are a crop / rescale of an eval image
                    a_rows = np.arange(len(a_ok))
                    cropped, _ = crops.cropped_copies(
                        (a_desc, a_rows, lambda row: against.payload(a_ok[row])),
                        (pool_desc[0], alive, pool_desc[1]), o.crop_cos, o.crop_ncc, nprobe=o.nprobe,
                        workers=o.workers, on_progress=crop_progress("against crops"))
                    for e_i, i in cropped.tolist():
                        hits.setdefault(i, (e_i, f"duplicates an evaluation image ({crop_text})"))
                for i, (e_i, why) in sorted(hits.items()):
                    gone.add(i)
                    rem.append({"path": pool.keys[alive[i]], "stage": "against", "reason": why,
                                "duplicate_of": f"{o.against}:{against.keys[a_ok[e_i]]}"})
                bar.update(job, advance=1, skipped=len(gone))
            rest = np.asarray([j for j in range(len(alive)) if j not in gone], np.int64)
            extra = []
            if pool_desc is not None:
                cropped, _ = crops.cropped_copies((pool_desc[0], alive[rest], pool_desc[1]), None,
                                                  o.crop_cos, o.crop_ncc, nprobe=o.nprobe,
                                                  workers=o.workers,
                                                  on_progress=crop_progress("cropped copies"))
                extra.append((crop_text, cropped))
            dups = dedup.near_duplicates(codes[rest], emb[rest] if len(rest) < len(emb) else emb,
                                         area[rest], sharp[rest], o.phash_radius, o.near_cos,
                                         o.phash_cos, o.nprobe, extra=extra,
                                         lossy=None if lossy is None else lossy[rest])
            for i, k, why in dups:
                gone.add(int(rest[i]))
                rem.append({"path": pool.keys[alive[rest[i]]], "stage": "near", "reason": why,
                            "duplicate_of": pool.keys[alive[rest[k]]]})
            bar.update(job, advance=1, skipped=len(gone))
        keep = np.asarray([j for j in range(len(alive)) if j not in gone], np.int64)
        np.save(work.path / "near_keep.npy", keep)  # positions into the embedding rows
        return {"removed": rem, "kept": len(keep)}

    run("near", {"radius": o.phash_radius, "cos": o.near_cos, "verify": o.phash_cos,
                 "crop_ncc": o.crop_ncc, "crop_cos": o.crop_cos, "against": _abs(o.against),
                 "against_mtime": _mtime(o.against)}, near)
    keep_e = np.load(work.path / "near_keep.npy")
    if len(keep_e) == 0:
        raise ValueError(_empty_message(pool, removed, "near"))

    # 5. cluster + balanced sampling -------------------------------------------------------------
    def cluster_stage() -> dict[str, Any]:
        x = emb[keep_e] if len(keep_e) < len(emb) else emb
        counts = o.clusters or cl.auto_cluster_counts(len(keep_e))
        with _bar(o.progress) as bar:
            job = bar.add_task("cluster + sample", total=2, skipped=0)
            levels = cl.hierarchical_kmeans(x, counts, o.resampling_steps, niter=o.kmeans_iters,
                                            seed=o.seed)
            bar.update(job, advance=1)
            chosen = cl.balanced_sample(levels, o.target_size, o.seed) if o.target_size \
                else np.arange(len(keep_e))
            bar.update(job, advance=1)
        np.savez(work.path / "cluster.npz", chosen=chosen, **{f"level{t}": a for t, a in enumerate(levels)})
        leaf = levels[0]
        return {"cluster_counts": list(counts),
                "leaf_sizes_before": np.bincount(leaf, minlength=counts[0]).tolist(),
                "leaf_sizes_after": np.bincount(leaf[chosen], minlength=counts[0]).tolist()}

    if o.target_size is not None and o.target_size > len(keep_e):
        raise ValueError(f"--target-size {o.target_size} is larger than the {len(keep_e)} images "
                         f"left after filtering and deduplication (of {n}); choose at most "
                         f"{len(keep_e)}. Finished stages are kept in {work.path}: the rerun "
                         f"resumes after them")
    cl_res = run("cluster", {"target": o.target_size, "clusters": o.clusters,
                             "steps": o.resampling_steps, "iters": o.kmeans_iters, "seed": o.seed},
                 cluster_stage)
    cz = np.load(work.path / "cluster.npz")
    chosen_e = keep_e[cz["chosen"]]  # embedding rows

    # 6. retrieve --------------------------------------------------------------------------------
    def retrieve_stage() -> dict[str, Any]:
        assert seeds is not None
        with _bar(o.progress) as bar:
            job = bar.add_task("retrieve", total=1, skipped=0)
            _, s_emb, _, _ = _describe(seeds, get_embedder(), o, need_codes=False)
            ids = cl.retrieve(emb[keep_e], s_emb, o.retrieve_k, o.nprobe)
            bar.update(job, advance=1)
        got = np.unique(keep_e[ids.reshape(-1)])
        np.save(work.path / "retrieved.npy", got)
        return {"seeds": len(seeds), "retrieved": int(len(got))}

    if seeds is not None:
        rt_res = run("retrieve", {"seed_set": _abs(o.seed_set), "k": o.retrieve_k,
                                  "mtime": _mtime(o.seed_set)}, retrieve_stage)
        got = np.load(work.path / "retrieved.npy")
        rows = np.union1d(got, chosen_e) if o.target_size else got
    else:
        rt_res = None
        rows = chosen_e
    if len(rows) == 0:
        raise ValueError(_empty_message(pool, removed, "retrieve"))
    selected = alive[np.sort(rows)]  # pool indices

    # 7. write -----------------------------------------------------------------------------------
    if on_stage:
        on_stage("write")
    t0 = time.time()
    report = {
        "format": "dvtrain-curation-report", "version": 1,
        "source": src, "out": out, "work_dir": str(work.path),
        "options": asdict(o),
        "versions": _versions(),
        "embedder": emb_res.get("embedder"),
        "counts": {"source": n + len(pool.pre_skipped),
                   "after_quality": int(len(q["alive"])), "after_exact": int(len(alive)),
                   "after_near": int(len(keep_e)),
                   "after_sampling": int(len(chosen_e)),
                   "retrieved": rt_res["retrieved"] if rt_res else None,
                   "selected": int(len(selected))},
        "other_files": pool.other_files,
        "removed_per_stage": {s: sum(r["stage"] == s for r in removed)
                              for s in ("quality", "exact", "near", "against")},
        "clusters": {"counts_per_level": cl_res["cluster_counts"],
                     "leaf_sizes_before": cl_res["leaf_sizes_before"],
                     "leaf_sizes_after": cl_res["leaf_sizes_after"]},
        "resumed_stages": resumed,
        "removed": removed,
        "selected_keys": [pool.keys[i] for i in selected.tolist()],
    }
    report["timings_s"] = dict(timings)  # seconds per stage that ran (resumed: from its first run)
    report["seconds_before_write"] = round(t0 - t_start, 3)
    _write_output(pool, selected, out, o, report, emb, keep_e, cz, alive)
    report["timings_s"]["write"] = round(time.time() - t0, 3)
    report["total_s"] = round(time.time() - t_start, 3)
    return CurateResult(out, report, resumed)


def _describe(p: Pool, embedder, o: CurateOptions, need_codes: bool = True):
    """What the near-duplicate tests need of an evaluation / seed set, for its M images that decode:
    (perceptual hashes [M, 8] uint8 or None, embeddings [M, D] fp32, crop descriptors [M, B, T]
    fp16 or None (:mod:`.crops`), positions in ``p`` [M]).

    Raises:
        ValueError: no image of the set decodes.
    """
    payloads = [p.payload(i) for i in range(len(p))]
    codes = desc = None
    ok = list(range(len(p)))
    if need_codes:
        with_crops = o.crop_ncc is not None
        recs = list(scan_images(payloads, o.workers, with_crops=with_crops))
        ok = [i for i, r in enumerate(recs) if r["ok"]]
        codes = dedup.phash_array([recs[i]["phash"] for i in ok]) if ok else np.zeros((0, 8), np.uint8)
        if with_crops and ok:
            desc = np.stack([recs[i]["crop_desc"] for i in ok])
    with tempfile.TemporaryDirectory(prefix="dvtrain-curate-") as tmp:
        e = np.asarray(write_embeddings(embedder, [payloads[i] for i in ok], Path(tmp) / "e.npy",
                                        o.batch_size), dtype=np.float32)
    if len(ok) == 0 or not np.abs(e).sum(1).any():
        raise ValueError(f"{p.src}: none of its {len(p)} images decodes")
    return codes, e, desc, ok


def _write_output(pool: Pool, selected: np.ndarray, out: str, o: CurateOptions,
                  report: dict[str, Any], emb, keep_e, cz, alive) -> None:
    from streaming import MDSWriter

    from dvtrain.data.curate.report import write_report_png

    remote = shards.is_remote(out)
    staging = Path(tempfile.mkdtemp(prefix="dvtrain-curate-out-")) if remote else None
    if remote:
        assert staging is not None
        work_dir = staging / "shards"
        writer_out: Any = (str(work_dir), out)
    else:
        final = Path(out).expanduser().absolute()
        work_dir = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        if work_dir.exists():
            shutil.rmtree(work_dir)
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        writer_out = str(work_dir)
    writer = MDSWriter(out=writer_out, columns=shards.COLUMNS, compression=None,
                       size_limit=o.shard_size)
    from collections import Counter

    label_counts: Counter[int] = Counter()
    formats: Counter[str] = Counter()
    widths, heights = [], []
    finished = False
    try:
        from PIL import Image
        import io

        with _bar(o.progress) as bar:
            job = bar.add_task("write", total=len(selected), skipped=0)
            for i in selected.tolist():
                data = encoded_bytes(pool.payload(i))
                with Image.open(io.BytesIO(data)) as im:
                    formats[im.format or "UNKNOWN"] += 1
                    widths.append(im.size[0])
                    heights.append(im.size[1])
                label = int(pool.labels[i])
                writer.write({"image": data, "label": label, "key": pool.keys[i]})
                label_counts[label] += 1
                bar.update(job, advance=1)
        writer.finish()
        finished = True
        source = shards.ImageSource(pool.kind, {"kind": pool.kind, "path": pool.src,
                                            "curated": True}, [], pool.label_names, [])
        manifest = shards.build_manifest(source, [None] * len(selected), len(selected), label_counts,
                                         formats, widths, heights, [], 0, None, None)
        manifest["num_source_entries"] = report["counts"]["source"]
        manifest["curation"] = {"report": REPORT_JSON, "counts": report["counts"]}
        local = staging / "extra" if remote else work_dir
        local.mkdir(parents=True, exist_ok=True)
        write_json_atomic(local / shards.MANIFEST_NAME, manifest, sort_keys=True)
        write_json_atomic(local / REPORT_JSON, report)
        write_report_png(local / REPORT_PNG, pool, report, emb, keep_e, cz, alive, selected)
        if remote:
            from streaming.base.storage.upload import CloudUploader

            up = CloudUploader.get((str(local), out), keep_local=True, exist_ok=True)
            for name in (REPORT_JSON, REPORT_PNG, shards.MANIFEST_NAME):
                up.upload_file(name)
        else:
            shards.swap_into_place(work_dir, Path(out).expanduser().absolute())
    except BaseException:
        if not finished:
            writer.cancel_future_jobs()
        if not remote and work_dir.exists():
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _empty_message(pool: Pool, removed: list[dict[str, Any]], stage: str) -> str:
    per = {s: sum(r["stage"] == s for r in removed) for s in ("quality", "exact", "near", "against")}
    first = removed[0] if removed else None
    hint = (f"; first removal: {first['path']}: {first['reason']}" if first else "")
    return (f"no image of {pool.src} is left after the {stage} stage (of {len(pool)}: removed "
            f"{per}){hint}. Loosen the thresholds (--min-side, --min-sharpness, --min-std, "
            f"--phash-radius, --near-cos) or check the seed set")


def _abs(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().absolute())


def _mtime(p: str | None) -> float | None:
    if p is None or p == "pixels":
        return None
    try:
        return os.stat(Path(p).expanduser()).st_mtime
    except OSError:
        return None


def _versions() -> dict[str, str]:
    import faiss
    import imagehash
    import PIL
    import torch

    return {"dvtrain": installed_version(), "faiss": faiss.__version__,
            "imagehash": imagehash.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
            "torch": torch.__version__, "python": platform.python_version()}
