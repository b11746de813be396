"""`dvtrain data curate` launched with two ranks (torchrun, gloo on 127.0.0.1, CPU): the embed
stage is split over the ranks and the result equals a one-process run's (embeddings bit-identical
with `--model pixels`, allclose with a backbone export; same selection, counts and stage
fingerprints, so a one-process rerun resumes the two-rank run's stages); only rank 0 prints; a bad
input (ranks started by hand, so that no launcher kills the waiting rank) stops both ranks with
rank 0's one message: rank 0 exits 1, rank 1 is released and exits 0.

The pool is tests/curate_pool.py's planted Fashion-MNIST pool, small (a few seconds of work); most
of each test's time is starting torchrun and importing DeepSpeed in two processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curate_pool import build_pool
from dvtrain.data.curate import CurateOptions, curate

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--min-side", "24", "--min-sharpness", "40", "--batch-size", "16", "--no-progress"]
OPTS = dict(min_side=24, min_sharpness=40.0, batch_size=16, progress=False)
TIMEOUT_S = 240  # a hang shows up as a failure, not a stuck test


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    build_pool(root, num_base=70, per_kind=4)  # 70 + 5 x 4 copies + 3 x 2 rejects + 4 test copies
    return root / "pool"


def _torchrun(args: list[str], log_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m dvtrain data curate ARGS`; with
    ``log_dir`` every rank's stdout/stderr goes to files there."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port())]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir), "--redirects", "3"]
    cmd += ["-m", "dvtrain", "data", "curate", *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO)


def _free_port() -> int:
    from dvtrain.dist import find_free_port

    return find_free_port()


def _rank_log(log_dir: Path, rank: int, stream: str = "stdout") -> str:
    (path,) = log_dir.rglob(f"{rank}/{stream}.log")  # torchrun: <run id>/attempt_0/<rank>/
    return path.read_text()


def _export_tiny_vit(path: Path) -> None:
    from dvtrain.checkpoint.backbone import LoadedBackbone, backbone_kwargs
    from dvtrain.export import export_hub
    from dvtrain.models.vit import DinoVisionTransformer

    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=3).eval()
    export_hub(LoadedBackbone(m, backbone_kwargs(m), "test"), path)


@pytest.mark.parametrize("model", ["pixels", "backbone"])
def test_two_ranks_embed_what_one_process_embeds(pool_dir, tmp_path, model):
    extra: dict = {}
    cli_extra: list[str] = []
    if model == "backbone":  # a random-init ViT: its embeddings are all alike, so no cosine dedup
        _export_tiny_vit(tmp_path / "vit.pth")
        extra = dict(model=str(tmp_path / "vit.pth"), image_size=28, near_cos=None, phash_cos=None)
        cli_extra = ["--model", extra["model"], "--image-size", "28", "--near-cos", "2", "--phash-cos", "2"]
    one = curate(pool_dir, tmp_path / "one", CurateOptions(target_size=40, **OPTS, **extra))

    logs = tmp_path / "logs"
    r = _torchrun([str(pool_dir), str(tmp_path / "two"), "--target-size", "40", *FLAGS, *cli_extra],
                  log_dir=logs)
    # torchrun exits 0 only when every rank did
    assert r.returncode == 0, (r.stdout + r.stderr + _rank_log(logs, 0, "stderr")
                               + _rank_log(logs, 1, "stderr"))[-4000:]
    out0, out1 = _rank_log(logs, 0), _rank_log(logs, 1)
    assert "stage embed" in out0 and "wrote 40 samples" in out0
    assert "stage" not in out1 and "wrote" not in out1  # only rank 0 speaks

    work_one, work_two = Path(one.report["work_dir"]), tmp_path / "two.curate-work"
    e1 = np.load(work_one / "embeddings.npy")
    e2 = np.load(work_two / "embeddings.npy")
    assert e1.dtype == e2.dtype == np.float16 and e1.shape == e2.shape
    assert e1.shape[0] > 3 * 16  # several batches: both ranks had rows to embed
    assert np.abs(e2.astype(np.float32)).sum(1).min() > 0  # no row left unwritten (zeros)
    if model == "pixels":
        assert e1.tobytes() == e2.tobytes()
    else:
        np.testing.assert_allclose(e2.astype(np.float32), e1.astype(np.float32), atol=1e-3)

    two = json.loads((tmp_path / "two" / "curation_report.json").read_text())
    assert two["selected_keys"] == one.report["selected_keys"]
    assert two["counts"] == one.report["counts"] and two["embedder"] == one.report["embedder"]
    assert two["removed"] == one.report["removed"]
    # resume semantics unchanged: same stage fingerprints, so a one-process rerun resumes them
    s1 = json.loads((work_one / "state.json").read_text())["stages"]
    s2 = json.loads((work_two / "state.json").read_text())["stages"]
    assert {k: v["fingerprint"] for k, v in s1.items()} == {k: v["fingerprint"] for k, v in s2.items()}
    again = curate(pool_dir, tmp_path / "again", CurateOptions(target_size=30, work_dir=str(work_two),
                                                               **OPTS, **extra))
    assert again.resumed == ["quality", "exact", "embed", "near"]
    assert again.report["counts"]["selected"] == 30


def _ranks_by_hand(args: list[str], logs: Path, world_size: int = 2) -> list[tuple[int, str]]:
    """Start `python -m dvtrain data curate ARGS` once per rank with the launcher environment set
    by hand (as the `deepspeed` launcher or srun would): unlike torchrun, nothing here stops the
    other ranks when rank 0 fails, so a rank left waiting shows up as a timeout or a gloo error.
    Returns (exit code, stdout + stderr) per rank."""
    port = _free_port()
    logs.mkdir(parents=True)
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        with open(logs / f"rank{rank}.txt", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "dvtrain", "data", "curate", *args],
                                          env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(c, (logs / f"rank{r}.txt").read_text()) for r, c in enumerate(codes)]


def test_two_ranks_stop_on_rank_0s_bad_input(pool_dir, tmp_path):
    # after the embed stage: a target larger than what is left
    (rc0, said0), (rc1, said1) = _ranks_by_hand([str(pool_dir), str(tmp_path / "o1"),
                                                 "--target-size", "1000", *FLAGS], tmp_path / "l1")
    assert rc0 == 1 and rc1 == 0, (said0 + said1)[-4000:]  # rank 1 released, not left waiting
    assert "error: --target-size 1000 is larger than the" in said0
    assert "Traceback" not in said0 + said1 and "error" not in said1  # one message, rank 0's
    state = json.loads((tmp_path / "o1.curate-work" / "state.json").read_text())
    assert set(state["stages"]) == {"quality", "exact", "embed", "near"}  # kept for the rerun

    # before the embed stage: a model that cannot load; nothing is written
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    (rc0, said0), (rc1, said1) = _ranks_by_hand([str(pool_dir), str(tmp_path / "o2"), "--model",
                                                 str(tmp_path / "bad.pth"), *FLAGS], tmp_path / "l2")
    assert rc0 == 1 and rc1 == 0 and "cannot be loaded" in said0, (said0 + said1)[-4000:]
    assert "Traceback" not in said0 + said1 and "error" not in said1
    assert not (tmp_path / "o2.curate-work").exists()
