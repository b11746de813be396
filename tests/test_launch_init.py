"""`dvtrain launch` end to end with pretrained weights: a run's hub export as model.init_from with the backbone
frozen gives back the source tensors bit for bit; relaunching the finished run resumes its own checkpoint
without the init file; distillation from the run (heads objective) trains and exports a half-width student."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_launch import launch_cmd, run, shards, teacher, tiny_overrides  # noqa: F401 - shards is a fixture


@pytest.mark.slow
def test_launch_init_from_freeze_resume_and_distill(shards, tmp_path):  # noqa: F811
    source_run = tmp_path / "source"
    res = run(launch_cmd(source_run, tiny_overrides(shards, "eval.train_path=null", "eval.val_path=null")))
    assert res.returncode == 0, res.stderr[-3000:]
    export = source_run / "export" / "teacher_backbone.pth"
    source = teacher(source_run)

    # continued pretraining: 6 iterations, backbone frozen for 5 (and the 6th is the first of its warmup, at 0)
    cont = tmp_path / "continued"
    ovs = tiny_overrides(shards, f"model.init_from={export}", "optim.freeze_backbone_iterations=5",
                         "eval.train_path=null", "eval.val_path=null")
    res = run(launch_cmd(cont, ovs))
    assert res.returncode == 0, res.stderr[-3000:]
    got = teacher(cont)
    assert got.keys() == source.keys()
    for k, v in source.items():
        assert torch.equal(got[k], v), k
    rows = [json.loads(line) for line in (cont / "metrics.jsonl").read_text().splitlines()]
    assert [r["backbone_lr_scale"] for r in rows if "total" in r] == [0.0] * 6

    # relaunch from iteration 4: resumes its own checkpoint and never reads model.init_from (gone now)
    export.unlink()
    shutil.rmtree(cont / "checkpoints" / "iter_00000006")
    res = run(launch_cmd(cont, ovs))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((cont / "summary.json").read_text())["iterations"] == 6
    for k, v in source.items():
        assert torch.equal(teacher(cont)[k], v), k
    res = run(launch_cmd(tmp_path / "fresh", ovs))  # a new run needs it: one message before any engine
    assert res.returncode == 1 and "model.init_from=" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr

    # distillation from the run (it has heads): half-width student, the EMA student is exported
    dist = tmp_path / "distilled"
    res = run(launch_cmd(dist, tiny_overrides(shards, f"distill.teacher={source_run}", "model.embed_dim=24",
                                              "schedule.iterations_per_epoch=4")))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((dist / "summary.json").read_text())
    assert summary["iterations"] == 4 and 0.0 <= summary["knn"]["per_k"]["5"]["top1"] <= 100.0
    assert teacher(dist)["cls_token"].shape[-1] == 24
