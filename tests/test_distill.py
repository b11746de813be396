"""Distillation (distill.teacher): the paper's objective reuses SSLMetaArch with the frozen teacher's head
outputs as targets; feature distillation; the frozen teacher is partitioned by the one ZeRO-3 engine (1 and 2
ranks), never trained; the EMA of the student is what is exported; `dvtrain show` counts both networks."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _dist_utils import make_batch, run_ranks, tiny_recipe
from dvtrain.recipe import REPO_ROOT

STUDENT = {"embed_dim": 16, "num_heads": 2}  # half the width of the tiny teacher (32)


def _template(tmp: Path) -> str:
    """The shipped ZeRO-3 template with persistence 0: every parameter is partitioned (a tiny model's
    parameters are all below the shipped 1e5-element threshold, which keeps small ones whole)."""
    cfg = json.loads((REPO_ROOT / "ds_configs/zero3_fp16.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / "zero3_nopersist.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A dvtrain run directory (tiny width-32 model, 2 iterations) with DINO/iBOT heads."""
    from dvtrain.dist import init_distributed
    from dvtrain.train.trainer import Trainer

    init_distributed()
    run = tmp_path_factory.mktemp("teacher_run")
    tr = Trainer(tiny_recipe())
    for s in range(2):
        tr.train_step(make_batch(s))
    tr.save_checkpoint(run / "checkpoints")
    tr.engine.destroy()
    return run


def test_heads_objective_is_ssl_with_the_frozen_teacher_as_target():
    from dvtrain.train.distill import DistillMetaArch
    from dvtrain.train.meta_arch import SSLMetaArch
    from dvtrain.train.meta_arch import meta_arch_config_from_recipe

    cfg = meta_arch_config_from_recipe(tiny_recipe())
    torch.manual_seed(0)
    ssl = SSLMetaArch(cfg).train()
    torch.manual_seed(0)
    dist = DistillMetaArch(cfg, copy.deepcopy(ssl.teacher)).train()
    batch = make_batch(0)
    torch.manual_seed(1)
    a = ssl(batch, teacher_temp=0.05)
    torch.manual_seed(1)
    b = dist(batch, teacher_temp=0.05)
    assert a.keys() == b.keys()
    for k in a:  # a frozen teacher equal to the EMA teacher gives the SSL losses exactly
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        for p in dist.frozen_teacher.parameters():
            p.add_(0.1)
    torch.manual_seed(1)
    c = dist(batch, teacher_temp=0.05)
    assert not torch.equal(c["dino_global_crops_loss"], a["dino_global_crops_loss"])
    c["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in dist.frozen_teacher.parameters())
    assert all(p.grad is None for p in dist.teacher.parameters())
    assert not dist.frozen_teacher.training and not dist.teacher.training


def test_feature_objective_values(tmp_path):
    from dvtrain.checkpoint.backbone import LoadedBackbone, backbone_kwargs, backbone_template
    from dvtrain.export import export_hub
    from dvtrain.models.vit import DinoVisionTransformer
    from dvtrain.train.build import build_meta_arch
    from dvtrain.train.distill import FeatureDistillMetaArch

    torch.manual_seed(3)
    src = DinoVisionTransformer(**backbone_template(tiny_recipe())[0]).eval()  # width 32, patch 14: 2 x 2 grid
    export_hub(LoadedBackbone(src, backbone_kwargs(src), "training", "teacher", {}), tmp_path / "t.pth")
    recipe = tiny_recipe(model={**STUDENT, "patch_size": 7, "drop_path_rate": 0.0},  # 4 x 4 grid
                         distill={"teacher": str(tmp_path / "t.pth")}, loss={"koleo_weight": 0.0})
    model = build_meta_arch(recipe, apply_init=True)
    assert isinstance(model, FeatureDistillMetaArch)
    x = make_batch(0)["collated_global_crops"]
    losses = model({"collated_global_crops": x})
    with torch.no_grad():
        t = src(x, is_training=True)
        s = model.student.backbone(x, is_training=True)
        ps = model.student.cls_proj(s["x_norm_clstoken"])
        cos = (ps * t["x_norm_clstoken"]).sum(-1) / (ps.norm(dim=-1) * t["x_norm_clstoken"].norm(dim=-1))
        assert losses["feature_cls_loss"].item() == pytest.approx((1 - cos).mean().item(), abs=1e-6)
        grid = t["x_norm_patchtokens"].transpose(1, 2).reshape(x.shape[0], 32, 2, 2)
        target = F.interpolate(grid, size=(4, 4), mode="bilinear").flatten(2).transpose(1, 2)
        pp = model.student.patch_proj(s["x_norm_patchtokens"])
        cos = (pp * target).sum(-1) / (pp.norm(dim=-1) * target.norm(dim=-1))
        assert losses["feature_patch_loss"].item() == pytest.approx((1 - cos).mean().item(), abs=1e-6)
    assert losses["total"].item() == pytest.approx(losses["feature_cls_loss"].item() + losses["feature_patch_loss"].item())


def test_bad_teacher_is_reported_before_the_engine(tmp_path, teacher_run):
    from dvtrain.models.init_from import check_init_from

    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"distill.teacher=.*list.pth: .*not a state dict"):
        check_init_from(tiny_recipe(distill={"teacher": str(tmp_path / "list.pth")}))
    with pytest.raises(ValueError, match=r"num_prototypes: teacher 64, student 128 -> set loss.num_prototypes=64"):
        check_init_from(tiny_recipe(model=STUDENT, loss={"num_prototypes": 128}, distill={"teacher": str(teacher_run)}))
    with pytest.raises(ValueError, match="distill.objective=heads needs a teacher with DINO/iBOT heads"):
        check_init_from(tiny_recipe(distill={"teacher": str(tmp_path / "list.pth"), "objective": "heads"}))


def test_a_flatter_teacher_temperature_than_the_teacher_run_is_warned(teacher_run):
    from dvtrain.train.distill import teacher_temperature_advice

    t_temp = tiny_recipe().teacher.temp  # what the teacher run trained with
    same = tiny_recipe(model=STUDENT, distill={"teacher": str(teacher_run)})
    assert teacher_temperature_advice(same) is None
    sharper = tiny_recipe(model=STUDENT, teacher={"temp": t_temp / 2, "temp_warmup_start": t_temp / 2},
                          distill={"teacher": str(teacher_run)})
    assert teacher_temperature_advice(sharper) is None
    flatter = tiny_recipe(model=STUDENT, teacher={"temp": t_temp * 2, "temp_warmup_start": t_temp * 2},
                          distill={"teacher": str(teacher_run)})
    assert teacher_temperature_advice(flatter) == (
        f"teacher.temp={t_temp * 2:g} is above the {t_temp:g} the distillation teacher ({teacher_run}) trained its "
        f"heads with: its targets will be flatter than it learned to produce, and near-uniform targets carry little "
        f"to distil; set teacher.temp={t_temp:g} (and teacher.temp_warmup_start)")
    assert teacher_temperature_advice(tiny_recipe()) is None  # no distillation


def test_validate_gives_the_flat_teacher_warning_launch_gives(teacher_run, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from dvtrain.cli import app

    t_temp = tiny_recipe().teacher.temp
    flatter = tiny_recipe(model=STUDENT, teacher={"temp": t_temp * 2, "temp_warmup_start": t_temp * 2},
                          distill={"teacher": str(teacher_run)})
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(flatter.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"teacher.temp={t_temp * 2:g} is above the {t_temp:g} the distillation teacher" in text
    assert text.count("ok ") == 1


def test_recipe_rules():
    from dvtrain.recipe import RecipeError

    with pytest.raises(RecipeError, match="distill.objective=heads needs distill.teacher"):
        tiny_recipe(distill={"objective": "heads"})
    with pytest.raises(RecipeError, match="both 0: the features objective trains nothing"):
        tiny_recipe(distill={"teacher": "t.pth", "objective": "features", "cls_weight": 0, "patch_weight": 0})
    with pytest.raises(RecipeError, match="freeze_backbone_iterations=10 is not below the run's 10 iterations"):
        tiny_recipe(optim={"freeze_backbone_iterations": 10})


def test_show_counts_teacher_and_student(teacher_run):
    from dvtrain.checkpoint.backbone import load_backbone
    from dvtrain.flops import model_summary, vit_forward_flops, vit_shape_from_kwargs
    from dvtrain.train.build import build_meta_arch

    recipe = tiny_recipe(model=STUDENT, distill={"teacher": str(teacher_run)})
    rows = model_summary(recipe)
    model = build_meta_arch(recipe, apply_init=True)
    assert rows[0]["parameters"] == sum(p.numel() for p in model.student.parameters())
    assert rows[1]["parameters"] == sum(p.numel() for p in model.frozen_teacher.parameters())
    # hand count of the teacher backbone forward at 28 px (D 32, patch 14: 4 patches + cls, MLP 128, 2 blocks):
    # patch embed 4*3*196*32 + 2 * (4*32*32*5 + 2*5*5*32 + 2*32*128*5) multiply-adds = 201344
    kw = load_backbone(teacher_run).kwargs
    assert vit_forward_flops(vit_shape_from_kwargs(kw), 28) == 2 * 201344
    assert rows[1]["flops_per_step"] == rows[1]["flops_per_image"] * 4


def _distill_ranks(rank, world, args, out_dir):
    """Heads distillation in every rank: partition sizes of the frozen teacher, losses, exported EMA student."""
    import deepspeed

    from dvtrain.train.trainer import Trainer

    recipe = tiny_recipe(model=STUDENT, distill={"teacher": args["teacher"]}, zero={"config": args["template"]})
    tr = Trainer(recipe)
    frozen = list(tr.model.frozen_teacher.parameters())
    with deepspeed.zero.GatheredParameters(frozen):
        before = [p.detach().clone() for p in frozen]
    losses = [tr.train_step(make_batch(s, 4, offset=4 * rank)) for s in range(2)]
    with deepspeed.zero.GatheredParameters(frozen):
        after = [p.detach().clone() for p in frozen]
    return {
        "parts": [(p.ds_numel, p.ds_tensor.numel(), p.data.numel(), str(p.ds_tensor.dtype)) for p in frozen],
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
        "frozen": before,
        "losses": losses,
        "ema": tr.export_teacher_backbone(),
        "student": tr.export_student_backbone(),
    }


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.dist)])
def test_distill_partitions_the_frozen_teacher(tmp_path, teacher_run, world):
    from dvtrain.checkpoint.backbone import load_backbone, load_teacher_heads

    args = {"teacher": str(teacher_run), "template": _template(tmp_path)}
    if world == 1:
        from dvtrain.dist import init_distributed

        init_distributed()
        results = [_distill_ranks(0, 1, args, tmp_path)]
    else:
        results = run_ranks(__file__, "_distill_ranks", world_size=2, tmp_path=tmp_path, args=args)
    src = load_backbone(teacher_run).model.state_dict()
    heads, _ = load_teacher_heads(teacher_run)
    expected = list(src.values()) + [v for h in heads.values() for v in h.values()]
    for res in results:
        for numel, local, placeholder, dtype in res["parts"]:
            assert local == math.ceil(numel / world) and placeholder == 0 and dtype == "torch.float32"
        total = sum(p[0] for p in res["parts"])
        assert sum(p[1] for p in res["parts"]) < total / world + len(res["parts"])  # each rank: only its shard
        assert res["unchanged"]
        assert len(res["frozen"]) == len(expected)  # frozen teacher = the run's teacher (backbone + heads)
        for got, exp in zip(res["frozen"], expected):
            assert torch.equal(got, exp)
        for m in res["losses"]:
            assert math.isfinite(m["total"]) and "dino_global_crops_loss" in m and "ibot_loss" in m
        assert res["ema"]["cls_token"].shape[-1] == 16
        assert any(not torch.equal(res["ema"][k], res["student"][k]) for k in res["ema"])  # EMA, not the student
    if world == 2:
        for k, v in results[0]["ema"].items():
            assert torch.equal(v, results[1]["ema"][k]), k
        assert [m["total"] for m in results[0]["losses"]] != [m["total"] for m in results[1]["losses"]]


def test_frozen_teacher_runs_in_the_compute_dtype_without_grad(tmp_path, teacher_run):
    from dvtrain.dist import init_distributed
    from dvtrain.train.trainer import Trainer

    init_distributed()
    recipe = tiny_recipe(precision="bf16", model=STUDENT, distill={"teacher": str(teacher_run), "objective": "features"},
                         zero={"config": _template(tmp_path)})
    tr = Trainer(recipe)
    seen = []
    tr.model.frozen_teacher.backbone.register_forward_hook(
        lambda mod, args, out: seen.append((torch.is_grad_enabled(), out["x_norm_clstoken"].dtype, mod.training)))
    m = tr.train_step(make_batch(0))
    assert seen == [(False, torch.bfloat16, False)]
    assert all(p.ds_tensor.dtype == torch.bfloat16 for p in tr.model.frozen_teacher.parameters())
    assert {"feature_cls_loss", "feature_patch_loss", "koleo_loss"} <= set(m) and math.isfinite(m["total"])
    tr.engine.destroy()
