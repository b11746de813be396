"""model.init_from: every checkpoint kind loads into student and teacher; architecture mismatches, bad files;
model.arch=from_init; position resampling; transformers' own HF directory; backbone freeze (bit for bit under
ZeRO-3, heads moving); resume does not re-apply init_from."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist_utils import make_batch, tiny_recipe
from dvtrain.checkpoint.backbone import LoadedBackbone, backbone_kwargs, backbone_template
from dvtrain.export import export_hf, export_hub, export_safetensors, hub_state_dict
from dvtrain.models.init_from import check_init_from
from dvtrain.models.vit import DinoVisionTransformer, resample_pos_embed
from dvtrain.recipe import RecipeError, dump_recipe
from dvtrain.train.build import build_meta_arch

REPO = Path(__file__).resolve().parent.parent


def _source(recipe, seed: int = 3) -> DinoVisionTransformer:
    """A backbone shaped like ``recipe``'s with every tensor perturbed (nothing equals a fresh init)."""
    torch.manual_seed(seed)
    kw, _ = backbone_template(recipe)
    model = DinoVisionTransformer(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _loaded(model):
    return LoadedBackbone(model, backbone_kwargs(model), "training", "teacher", {})


def _chunked(sd: dict, depth: int, chunks: int, prefix: str) -> dict:
    """Reference FSDP layout: ``blocks.<chunk>.<global index>.*`` under ``prefix``."""
    per = depth // chunks
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            k = f"blocks.{int(i) // per}.{i}.{rest}"
        out[prefix + k] = v
    return out


def _write(fmt: str, model, tmp: Path) -> Path:
    sd = hub_state_dict(model)
    if fmt == "dvtrain-hub":
        export_hub(_loaded(model), tmp / "t.pth")
        return tmp / "t.pth"
    if fmt == "safetensors":
        export_safetensors(_loaded(model), tmp / "t.safetensors")
        return tmp / "t.safetensors"
    if fmt == "hf":
        export_hf(_loaded(model), tmp / "hf", verify=False)
        return tmp / "hf"
    if fmt == "dinov2-hub":
        torch.save(sd, tmp / "dinov2_hub.pth")
        return tmp / "dinov2_hub.pth"
    if fmt == "dinov2-train":  # model_*.pth of the reference: chunked blocks, teacher./student. prefixes
        other = {k: torch.zeros_like(v) for k, v in sd.items()}
        state = {**_chunked(sd, len(model.blocks), 2, "teacher.backbone."),
                 **_chunked(other, len(model.blocks), 2, "student.backbone."),
                 "teacher.dino_head.mlp.0.weight": torch.zeros(3, 3)}
        torch.save({"model": state, "iteration": 7}, tmp / "model_0000007.pth")
        return tmp / "model_0000007.pth"
    if fmt == "dinov2-teacher":  # teacher_checkpoint.pth of the reference
        torch.save({"teacher": _chunked(sd, len(model.blocks), 1, "backbone.")}, tmp / "teacher_checkpoint.pth")
        return tmp / "teacher_checkpoint.pth"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt,registers", [
    ("dvtrain-hub", 0), ("safetensors", 4), ("hf", 4), ("hf", 0), ("dinov2-hub", 4), ("dinov2-train", 0),
    ("dinov2-teacher", 4),
])
def test_every_format_loads_into_student_and_teacher(tmp_path, fmt, registers):
    extra = {"num_register_tokens": registers}
    if registers or fmt == "hf":  # HF and the hub's register models resample with an explicit size
        extra.update(interpolate_offset=0.0, interpolate_antialias=bool(registers))
    src = _source(tiny_recipe(model=extra))
    path = _write(fmt, src, tmp_path)
    recipe = tiny_recipe(model={**extra, "init_from": str(path)})
    check_init_from(recipe)
    model = build_meta_arch(recipe, apply_init=True)
    expected = src.state_dict()
    for part in (model.student, model.teacher):
        got = part["backbone"].state_dict()
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(got[k], v), (fmt, k)
    fresh = build_meta_arch(recipe, apply_init=False)  # resume path: the recipe's own init
    assert not torch.equal(fresh.student["backbone"].cls_token, src.cls_token)


def _hub(tmp_path, **model) -> Path:
    src = _source(tiny_recipe(model=model))
    return _write("dvtrain-hub", src, tmp_path)


@pytest.mark.parametrize("override,expected", [
    ({"patch_size": 7}, "patch size: checkpoint 14, recipe 7 -> set model.patch_size=14"),
    ({"embed_dim": 48}, "width (embed_dim): checkpoint 32, recipe 48 -> set model.embed_dim=32"),
    ({"depth": 3}, "depth (blocks): checkpoint 2, recipe 3 -> set model.depth=2"),
    ({"num_heads": 4}, "attention heads: checkpoint 2, recipe 4 -> set model.num_heads=2"),
    ({"ffn_layer": "swiglu"}, "FFN type: checkpoint mlp, recipe swiglu -> set model.ffn_layer=mlp"),
    ({"mlp_ratio": 2.0}, "FFN hidden size: checkpoint 128, recipe 64 -> set model.mlp_ratio=4"),
    ({"num_register_tokens": 4}, "register tokens: checkpoint 0, recipe 4 -> set model.num_register_tokens=0"),
    ({"layerscale_init": None}, "LayerScale: checkpoint yes, recipe no -> set model.layerscale_init=1e-5"),
])
def test_each_mismatch_is_named_with_both_values_and_the_setting(tmp_path, override, expected):
    path = _hub(tmp_path)
    recipe = tiny_recipe(model={**override, "init_from": str(path)})
    with pytest.raises(ValueError) as err:
        check_init_from(recipe)
    msg = str(err.value)
    assert msg.startswith(f"model.init_from={path}: the checkpoint's architecture differs from the recipe's: ")
    assert expected in msg and msg.count("->") == 1, msg
    with pytest.raises(ValueError, match="architecture differs"):  # the same check guards the model build
        build_meta_arch(recipe, apply_init=True)


def test_all_mismatches_in_one_message_and_from_init_takes_the_checkpoint(tmp_path):
    path = _hub(tmp_path, num_register_tokens=4, mlp_ratio=2.0)
    recipe = tiny_recipe(model={"init_from": str(path), "embed_dim": 48, "num_heads": 4, "depth": 3})
    with pytest.raises(ValueError) as err:
        check_init_from(recipe)
    msg = str(err.value)
    for part in ("model.embed_dim=32", "model.num_heads=2", "model.depth=2", "model.num_register_tokens=4",
                 "model.arch=from_init"):
        assert part in msg, msg
    resolved = tiny_recipe(model={"init_from": str(path), "arch": "from_init", "embed_dim": 48})
    m = resolved.model
    assert (m.arch, m.embed_dim, m.depth, m.num_heads, m.num_register_tokens, m.mlp_ratio) == (
        "vit_small", 32, 2, 2, 4, 2.0)
    check_init_from(resolved)
    with pytest.raises(RecipeError, match="model.arch=from_init needs model.init_from"):
        tiny_recipe(model={"arch": "from_init"})


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = _hub(tmp_path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(2), torch.ones(2)], not_sd)
    neither = tmp_path / "some_dir"
    neither.mkdir()
    (neither / "notes.txt").write_text("hello")
    pickled = tmp_path / "code.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 4), "hook": logging.Formatter()}, pickled)  # not a tensor type
    return {
        "truncated": (truncated, "cannot be read as a tensor checkpoint with torch.load(weights_only=True)"),
        "not a state dict": (not_sd, "holds a list, not a state dict"),
        "neither run nor HF": (neither, "is a directory but not a dvtrain checkpoint or a Hugging Face Dinov2 directory"),
        "arbitrary pickle": (pickled, "weights_only=True"),
        "missing": (tmp_path / "nope.pth", "does not exist"),
    }


def test_bad_inputs_give_one_clear_message_each(tmp_path):
    for name, (path, expected) in _bad_inputs(tmp_path).items():
        recipe = tiny_recipe(model={"init_from": str(path)})
        with pytest.raises(ValueError) as err:
            check_init_from(recipe)
        assert str(err.value).startswith(f"model.init_from={path}: ") and expected in str(err.value), (name, err.value)


def test_cli_validate_reports_mismatch_and_bad_file_without_traceback(tmp_path):
    path = _hub(tmp_path)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(dump_recipe(tiny_recipe()))
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2], not_sd)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for init, expected in ((path, "set model.num_register_tokens=0"), (not_sd, "not a state dict")):
        proc = subprocess.run(
            [sys.executable, "-m", "dvtrain", "validate", str(recipe_file), "--set", f"model.init_from={init}",
             "--set", "model.num_register_tokens=4"],
            capture_output=True, text=True, timeout=180, env=env, cwd=REPO,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("error:") == 1


def test_position_table_resampled_to_the_crop_size_and_logged_once(tmp_path, caplog):
    src = _source(tiny_recipe())  # 28 px table: 2 x 2 patches of 14
    path = _write("dvtrain-hub", src, tmp_path)
    recipe = tiny_recipe(model={"init_from": str(path)}, crops={"global_size": 56})
    with caplog.at_level(logging.INFO, logger="dvtrain.models.convert"):
        model = build_meta_arch(recipe, apply_init=True)
    assert [r.message for r in caplog.records if "resampled" in r.message] == [
        "resampled checkpoint pos_embed from a 2x2 to a 4x4 grid (bicubic, offset 0.1, antialias False)"]
    patch = resample_pos_embed(src.pos_embed[:, 1:], (2, 2), (4, 4), 0.1, False)
    expected = torch.cat((src.pos_embed[:, :1], patch), dim=1)
    for part in (model.student, model.teacher):
        assert torch.equal(part["backbone"].pos_embed, expected)
        assert torch.equal(part["backbone"].blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_transformers_written_hf_directory_matches_transformers_outputs(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                                    image_size=28, patch_size=7, num_register_tokens=4, layerscale_value=0.5)
    hf = Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    recipe = tiny_recipe(model={"arch": "from_init", "init_from": str(tmp_path / "hf"), "drop_path_rate": 0.0},
                         crops={"global_size": 28, "local_size": 14})
    assert (recipe.model.patch_size, recipe.model.num_register_tokens, recipe.model.interpolate_offset,
            recipe.model.interpolate_antialias) == (7, 4, 0.0, True)
    check_init_from(recipe)
    model = build_meta_arch(recipe, apply_init=True)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        for part in (model.teacher, model.student.eval()):
            out = part["backbone"](x, is_training=True)
            ours = torch.cat((out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]), 1)
            assert (ours - ref).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------- with the engine


@pytest.mark.parametrize("fmt", ["dvtrain-hub", "hf"])
def test_freeze_keeps_backbone_bit_identical_under_zero3_then_releases(tmp_path, fmt):
    from dvtrain.checkpoint.backbone import load_backbone
    from dvtrain.dist import init_distributed
    from dvtrain.train.trainer import Trainer

    init_distributed()
    path = _write(fmt, _source(tiny_recipe()), tmp_path)
    source = load_backbone(path).model.state_dict()  # the export's own tensors (fp32)
    recipe = tiny_recipe(model={"init_from": str(path)},
                         optim={"freeze_backbone_iterations": 3, "backbone_warmup_iterations": 3})
    tr = Trainer(recipe)
    assert tr.engine.zero_stage == 3
    heads0 = tr.engine.gather_fp32_state_dict("teacher", "dino_head.")
    metrics = [tr.train_step(make_batch(s)) for s in range(3)]
    assert [m["backbone_lr_scale"] for m in metrics] == [0.0, 0.0, 0.0]
    backbone_groups = [g for g in tr.engine.param_groups if g["is_backbone"]]
    assert backbone_groups and all(g["lr"] == 0.0 and g["weight_decay"] == 0.0 for g in backbone_groups)
    assert any(g["lr"] > 0 for g in tr.engine.param_groups if not g["is_backbone"])
    for which in ("teacher", "student"):
        got = tr.engine.gather_fp32_state_dict(which, "backbone.")
        for k, v in source.items():
            assert torch.equal(got[k], v), (which, k)
    heads1 = tr.engine.gather_fp32_state_dict("teacher", "dino_head.")
    assert any(not torch.equal(heads0[k], heads1[k]) for k in heads0), "teacher heads did not move"
    more = [tr.train_step(make_batch(s)) for s in range(3, 6)]
    assert [m["backbone_lr_scale"] for m in more] == [0.0, 0.5, 1.0]  # own warmup: linspace(0, 1, 3)
    after = tr.export_teacher_backbone()
    assert any(not torch.equal(after[k], v) for k, v in source.items())


def test_resume_does_not_reapply_init_from(tmp_path):
    from dvtrain.dist import init_distributed
    from dvtrain.train.trainer import Trainer

    init_distributed()
    path = _hub(tmp_path)
    recipe = tiny_recipe(model={"init_from": str(path)}, optim={"freeze_backbone_iterations": 1})
    first = Trainer(recipe)
    for s in range(2):
        first.train_step(make_batch(s))
    first.save_checkpoint(tmp_path / "ckpt")
    state = first.engine.gather_fp32_state_dict("teacher", "")
    path.unlink()  # the init weights are gone: resuming must not need them
    with pytest.raises(ValueError, match=r"model.init_from=.*does not exist"):
        Trainer(recipe)
    resumed = Trainer(recipe, apply_init=False)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.iteration == 2
    for k, v in resumed.engine.gather_fp32_state_dict("teacher", "").items():
        assert torch.equal(v, state[k]), k


def test_dvtrain_run_directory_gives_backbone_and_heads(tmp_path):
    from dvtrain.checkpoint.backbone import load_backbone, load_teacher_heads
    from dvtrain.dist import init_distributed
    from dvtrain.models.init_from import apply_init_from
    from dvtrain.train.trainer import Trainer

    init_distributed()
    tr = Trainer(tiny_recipe(loss={"ibot_separate_head": True}))
    tr.train_step(make_batch(0))
    tr.save_checkpoint(tmp_path / "run" / "checkpoints")
    teacher_sd = tr.export_teacher_backbone()
    dino = tr.engine.gather_fp32_state_dict("teacher", "dino_head.")
    ibot = tr.engine.gather_fp32_state_dict("teacher", "ibot_head.")
    tr.engine.destroy()
    recipe = tiny_recipe(model={"init_from": str(tmp_path / "run")}, loss={"ibot_separate_head": True})
    check_init_from(recipe)
    model = build_meta_arch(recipe, apply_init=False)
    info = apply_init_from(model, recipe)
    assert info == {"source_format": "dvtrain-training", "heads_loaded": ["dino_head", "ibot_head"], "heads_fresh": []}
    for part in (model.student, model.teacher):
        for k, v in teacher_sd.items():
            assert torch.equal(part["backbone"].state_dict()[k], v), k
        for name, sd in (("dino_head", dino), ("ibot_head", ibot)):
            for k, v in sd.items():
                assert torch.equal(part[name].state_dict()[k], v), (name, k)
    # the same run as init_from with a shared iBOT head: the DINO head is loaded, nothing else is needed
    shared = tiny_recipe(model={"init_from": str(tmp_path / "run")})
    assert apply_init_from(build_meta_arch(shared, apply_init=False), shared)["heads_loaded"] == ["dino_head"]
    wrong = tiny_recipe(model={"init_from": str(tmp_path / "run")}, loss={"num_prototypes": 32})
    with pytest.raises(ValueError, match="the run's dino_head differs from the recipe's .* set loss.num_prototypes"):
        build_meta_arch(wrong, apply_init=True)
    assert load_backbone(tmp_path / "run").source_format == "dvtrain-training"
    assert set(load_teacher_heads(tmp_path / "run")[0]) == {"dino_head", "ibot_head"}
