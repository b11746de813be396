"""`dvtrain launch` end to end on real Fashion-MNIST shards with a tiny ViT (DeepSpeed ZeRO-3, CPU):
offline W&B files and metrics, validation errors before any process starts, the 2-process launch, and
the W&B sweep path (parameters from the `sweeps` package). Interrupted and resumed launches:
tests/test_resume_launch.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dvtrain.data.shards import convert_to_mds

REPO = Path(__file__).resolve().parent.parent
FMNIST = REPO / "data" / "fashion_mnist"

TINY = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "loss.num_prototypes=64", "loss.bottleneck_dim=32",
    "loss.head_hidden_dim=64", "crops.num_local_crops=2", "batch.micro_batch_per_device=8", "schedule.epochs=1",
    "schedule.iterations_per_epoch=6", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.2",
    "teacher.temp_warmup_epochs=0.5", "checkpoint.every=2", "checkpoint.keep_last=2", "data.num_workers=0",
    "wandb.log_every=1", "eval.bank_size=64", "eval.ks=[5]", "precision=fp32",
]

EXPECTED_METRIC_KEYS = {
    "total", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum",
    "teacher_temp", "loss_scale", "skipped_steps", "grad_norm", "images_per_s_per_rank", "images_per_s",
    "data_wait_fraction", "mfu", "peak_memory_gib", "iteration",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    names = [n for n in (FMNIST / "classes.txt").read_text().splitlines() if n.strip()]
    convert_to_mds(FMNIST / "train-images-idx3-ubyte.gz", root / "train", label_names=names, limit=96, progress=False)
    convert_to_mds(FMNIST / "t10k-images-idx3-ubyte.gz", root / "test", label_names=names, limit=48, progress=False)
    return root


def tiny_overrides(shards: Path, *extra: str) -> list[str]:
    return TINY + [f"data.path={shards / 'train'}", f"eval.train_path={shards / 'train'}",
                   f"eval.val_path={shards / 'test'}", *extra]


def launch_cmd(run_dir: Path, overrides: list[str], *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "dvtrain", "launch", str(REPO / "recipes/smoke_cpu.yaml"), "-o", str(run_dir), *args]
    for ov in overrides:
        cmd += ["--set", ov]
    return cmd


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
             PYTHONWARNINGS="ignore")
    for key in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)  # earlier in-process tests leave their process-group variables behind
    e.update(extra)
    return e


def run(cmd: list[str], timeout: int = 240, **extra_env: str) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env), cwd=REPO)
    return res


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def teacher(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "export" / "teacher_backbone.pth", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_launch_writes_run_directory_and_offline_wandb(shards, tmp_path):
    run_dir = tmp_path / "run"
    res = run(launch_cmd(run_dir, tiny_overrides(shards)))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["iterations"] == 6 and summary["images_seen"] == 48
    assert summary["skipped_steps"] == 0 and summary["world_size"] == 1
    assert 0.0 <= summary["knn"]["per_k"]["5"]["top1"] <= 100.0
    rows = [r for r in metrics(run_dir) if "total" in r]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert EXPECTED_METRIC_KEYS <= set(r), EXPECTED_METRIC_KEYS - set(r)
    assert rows[0]["lr"] == 0.0  # linear warmup starts at 0
    assert any("knn_top1" in r for r in metrics(run_dir))
    # offline W&B run files with the same metrics
    wandb_dirs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_dirs) == 1 and list(wandb_dirs[0].glob("*.wandb"))
    # resolved recipe, ds_config, checkpoints (keep_last=2), teacher export, pictures
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["depth"] == 2
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 8
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_00000004", "iter_00000006"]
    sd = teacher(run_dir)
    assert sd["pos_embed"].shape == (1, 1 + 16, 48) and all(t.numel() > 0 for t in sd.values())
    assert {p.name.split("_")[0] for p in (run_dir / "images").iterdir()} == {"crops", "teacher"}


@pytest.mark.slow
def test_launch_validation_errors_before_start(shards, tmp_path):
    # unreachable data
    res = run(launch_cmd(tmp_path / "r1", tiny_overrides(shards, f"data.path={tmp_path / 'nope'}")), timeout=60)
    assert res.returncode == 1 and "no such directory; convert images first" in res.stderr
    assert not (tmp_path / "r1").exists()
    # per-rank batch < 2
    res = run(launch_cmd(tmp_path / "r2", tiny_overrides(shards, "batch.micro_batch_per_device=1")), timeout=60)
    assert res.returncode == 1 and "KoLeo needs a nearest neighbour" in res.stderr
    # output directory holding a different run
    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe.yaml").write_text("seed: 123\n")
    res = run(launch_cmd(other, tiny_overrides(shards)), timeout=60)
    assert res.returncode == 1 and "holds a different run" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_ctrl_c_during_the_first_build_of_deepspeeds_cpu_op_is_a_stop(shards, tmp_path):
    """Where DeepSpeed's CPU communication op is not built yet (an empty TORCH_EXTENSIONS_DIR) the launch
    says it builds it (about 30 s); a Ctrl-C during that ninja build (the signal reaches ninja too) stops
    the launch with status 130 and one line, not a build-failure traceback and status 1."""
    import signal
    import time

    proc = subprocess.Popen(launch_cmd(tmp_path / "run", tiny_overrides(shards)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
                            env=env(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions")),
                            # SIGINT at its default even where this test runs with it ignored (a background job)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "building DeepSpeed's CPU communication op" in line:
                break
        assert seen and "building DeepSpeed's CPU communication op" in seen[-1], "".join(seen)[-2000:]
        time.sleep(2.0)  # ninja is compiling now (the build takes ~30 s on 2 cores)
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C stopped DeepSpeed's one-time build of its CPU communication op" in err
    assert err.rstrip().endswith("stopped (Ctrl-C)") and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_launch(shards, tmp_path):
    run_dir = tmp_path / "run2"
    ovs = tiny_overrides(shards, "schedule.iterations_per_epoch=3", "checkpoint.every=3")
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    res = run(launch_cmd(run_dir, ovs, "--nproc", "2"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # DeepSpeed's CPU allreduce workspaces (66 MB of RAM per rank) are unlinked, not left behind
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before == set()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 3 and summary["images_seen"] == 3 * 16
    rows = [r for r in metrics(run_dir) if "total" in r]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints/iter_00000003").glob("teacher_rank*.pt")) == [
        "teacher_rank00000.pt", "teacher_rank00001.pt"]


@pytest.mark.slow
def test_sweep_parameters_drive_two_launches(shards, tmp_path):
    import sweeps
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_cfg = yaml.safe_load((REPO / "recipes/sweeps/smoke_cpu_lr_koleo.yaml").read_text())
    runs: list = []
    for i in range(2):
        proposal = sweeps.next_run(sweep_cfg, runs, validate=True)
        params = json.loads(json.dumps(proposal.config, default=float))  # numpy scalars -> python
        args = sweep_utils.create_sweep_command_args({"args": params})["args"]
        param_file = tmp_path / f"config-{i}.yaml"
        param_file.write_text(yaml.safe_dump({"wandb_version": 1, **params}))
        run_dir = tmp_path / f"sweep{i}"
        cmd = launch_cmd(run_dir, tiny_overrides(shards, "schedule.iterations_per_epoch=2", "eval.train_path=null",
                                                 "eval.val_path=null")) + args
        res = run(cmd, WANDB_SWEEP_PARAM_PATH=str(param_file))
        assert res.returncode == 0, res.stderr[-3000:]
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        for key, spec in params.items():
            section, field = key.split(".")
            assert saved[section][field] == pytest.approx(spec["value"]), key
        proposal.state = sweeps.RunState.finished
        proposal.summary_metrics = {"knn_top1": float(i)}
        runs.append(proposal)
    assert runs[0].config != runs[1].config
