"""Export (hub / hf / safetensors) and checkpoint detection: key names, full shapes, strict loads,
equality with the real transformers library, clear errors for foreign files."""

import json
import pickle

import pytest
import torch
import typer
from typer.testing import CliRunner

from dvtrain.checkpoint.backbone import (
    LoadedBackbone,
    backbone_kwargs,
    detect_checkpoint_format,
    export_config_path,
    load_backbone,
)
from dvtrain.export import export_checkpoint, export_command, export_hf, export_hub, export_safetensors, hf_max_abs_diff
from dvtrain.models.vit import DinoVisionTransformer, build_backbone

IMG = 56  # training resolution of the tiny models: 4x4 patches of 14


def _tiny(**kw):
    """A depth-2 vit_tiny with non-trivial LayerScale gammas, tokens and biases (eval mode)."""
    m = build_backbone("vit_tiny", img_size=IMG, patch_size=14, depth=2, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("gamma", "bias", "cls_token", "register_tokens", "mask_token")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def _loaded(m):
    return LoadedBackbone(m, backbone_kwargs(m), "test")


def _reference_hub_keys(depth, registers, swiglu):
    """Key set of a facebookresearch/dinov2 hub backbone (dinov2_vits14[_reg] naming)."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    if registers:
        keys.add("register_tokens")
    ffn = ("mlp.w12", "mlp.w3") if swiglu else ("mlp.fc1", "mlp.fc2")
    for i in range(depth):
        for mod in ("norm1", "attn.qkv", "attn.proj", "norm2", *ffn):
            keys |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, True)])
def test_hub_export_keys_shapes_and_strict_load(tmp_path, registers, swiglu):
    kw = {"num_register_tokens": registers, "ffn_layer": "swiglu" if swiglu else "mlp"}
    if registers:  # the reference register models: explicit size + antialias
        kw.update(interpolate_offset=0.0, interpolate_antialias=True)
    m = _tiny(**kw)
    paths = export_hub(_loaded(m), tmp_path / "b.pth")
    assert paths == [tmp_path / "b.pth", tmp_path / "b.pth.json"]
    sd = torch.load(tmp_path / "b.pth", weights_only=True)
    assert set(sd) == _reference_hub_keys(2, registers, swiglu)
    assert all(v.dtype == torch.float32 and v.numel() > 0 for v in sd.values())
    assert sd["pos_embed"].shape == (1, 1 + 16, 192)
    if registers:
        assert sd["register_tokens"].shape == (1, 4, 192)
    torch.testing.assert_close(sd["blocks.1.ls2.gamma"], m.blocks[1].ls2.gamma.detach())
    cfg = json.loads((tmp_path / "b.pth.json").read_text())
    assert cfg["format"] == "dvtrain-hub"
    expected_mode = {"interpolation": "bicubic", "form": "size", "offset": 0.0, "antialias": True} if registers else \
        {"interpolation": "bicubic", "form": "scale_factor", "offset": 0.1, "antialias": False}
    assert cfg["pos_embed_resampling"] == expected_mode
    # strict load into a freshly built reference-named architecture from the recorded config
    fresh = DinoVisionTransformer(**cfg["backbone"])
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 70, 42)  # another, non-square resolution exercises the resampling mode
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().forward_features(x)["x_norm_patchtokens"], m.forward_features(x)["x_norm_patchtokens"])
    loaded = load_backbone(tmp_path / "b.pth")
    assert loaded.source_format == "dvtrain-hub" and loaded.kwargs == cfg["backbone"]


def test_zero_placeholders_are_rejected(tmp_path):
    m = _tiny()
    m.blocks[1].attn.qkv.weight.data = torch.empty(0)  # what an ungathered ZeRO-3 parameter looks like
    for export in (export_hub, export_safetensors):
        suffix = ".pth" if export is export_hub else ".safetensors"
        with pytest.raises(ValueError, match="ZeRO-3 partition placeholders"):
            export(_loaded(m), tmp_path / f"x{suffix}")
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "x.safetensors").exists()


def test_safetensors_roundtrip_and_metadata(tmp_path):
    from safetensors import safe_open

    m = _tiny(num_register_tokens=2)
    out = tmp_path / "w.safetensors"
    export_safetensors(_loaded(m), out)
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["dvtrain_config"])
        assert set(f.keys()) == set(m.state_dict())
    assert meta["backbone"] == backbone_kwargs(m) and meta["format"] == "dvtrain-safetensors"
    export_config_path(out).unlink()  # the metadata alone is enough
    loaded = load_backbone(out)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), m(x))
    with pytest.raises(ValueError, match="already exists"):
        export_safetensors(_loaded(m), out)


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_export_equals_ours_with_transformers(tmp_path, registers):
    transformers = pytest.importorskip("transformers")
    # HF resamples positions with an explicit size (registers: + antialias); a backbone built in
    # that mode (the reference's mode for register models) must match at every resolution
    m = _tiny(num_register_tokens=registers, interpolate_offset=0.0, interpolate_antialias=bool(registers),
              ffn_layer="swiglu" if registers else "mlp")  # fmt: skip
    export_hf(_loaded(m), tmp_path / "hf")
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    hf = cls.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(transformers.AutoModel.from_pretrained(str(tmp_path / "hf"))) is cls
    for size in (IMG, 98, (42, 70)):
        assert hf_max_abs_diff(m, hf, size) <= 1e-5, size
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, m(x), rtol=0, atol=1e-5)
    prov = json.loads((tmp_path / "hf" / "dvtrain_export.json").read_text())
    assert prov["hf_check"]["max_abs_diff"] <= 1e-5 and prov["resolution_note"] is None
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert proc.crop_size == {"height": IMG, "width": IMG}


def test_hf_export_of_reference_offset_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = _tiny()  # plain dinov2 mode: offset 0.1 scale-factor resampling
    export_hf(_loaded(m), tmp_path / "hf")
    hf = transformers.Dinov2Model.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf_max_abs_diff(m, hf, IMG) <= 1e-5  # the training resolution: equal
    assert hf_max_abs_diff(m, hf, 98) > 1e-4  # HF cannot express the 0.1 offset: recorded
    prov = json.loads((tmp_path / "hf" / "dvtrain_export.json").read_text())
    assert "offset 0.1" in prov["resolution_note"]
    # loading the HF directory back with dvtrain restores our resampling mode
    back = load_backbone(tmp_path / "hf")
    assert back.source_format == "hf" and back.kwargs["interpolate_offset"] == 0.1
    x = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), m(x), rtol=0, atol=1e-5)


def test_reference_dinov2_formats_are_detected(tmp_path):
    m = _tiny()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    chunked = {(k.replace("blocks.1.", "blocks.0.1.").replace("blocks.0.", "blocks.0.0.", 1) if k.startswith("blocks.0.") else
                k.replace("blocks.1.", "blocks.0.1.")): v for k, v in sd.items()}  # fmt: skip
    assert "blocks.0.1.attn.qkv.weight" in chunked and "blocks.0.0.attn.qkv.weight" in chunked
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in chunked.items()}, "dino_head.mlp.0.weight": torch.ones(2, 2)}},
               tmp_path / "teacher_checkpoint.pth")  # fmt: skip
    student = {f"student.backbone.{k}": v * 0 for k, v in sd.items()}
    torch.save({"model": {**{f"teacher.backbone.{k}": v for k, v in sd.items()}, **student}, "iteration": 5}, tmp_path / "model_0000004.pth")
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        want = m(x)
        for name in ("dinov2_vits14_pretrain.pth", "teacher_checkpoint.pth", "model_0000004.pth"):
            loaded = load_backbone(tmp_path / name)
            assert loaded.source_format == "dinov2-hub"
            torch.testing.assert_close(loaded.model(x), want)
        assert load_backbone(tmp_path / "model_0000004.pth", which="student").model.pos_embed.abs().max() == 0
    with pytest.raises(ValueError, match="holds one backbone"):
        load_backbone(tmp_path / "dinov2_vits14_pretrain.pth", which="student")
    # exporting a hub file again gives plain keys
    export_checkpoint(tmp_path / "teacher_checkpoint.pth", "hub", tmp_path / "plain.pth")
    assert set(torch.load(tmp_path / "plain.pth", weights_only=True)) == set(sd)


def test_foreign_checkpoints_give_clear_errors(tmp_path):
    torch.save({"fc.weight": torch.ones(3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a DINOv2 backbone state dict"):
        load_backbone(tmp_path / "resnet.pth")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": object()}))
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone(tmp_path / "evil.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_backbone(tmp_path / "list.pt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown checkpoint file type"):
        detect_checkpoint_format(tmp_path / "notes.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="not a dvtrain checkpoint"):
        detect_checkpoint_format(tmp_path / "emptydir")
    (tmp_path / "ckpts" / "iter_00000010.tmp-save").mkdir(parents=True)
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        detect_checkpoint_format(tmp_path / "ckpts")
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(tmp_path / "missing.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by `dvtrain export"):
        load_backbone(tmp_path / "other.safetensors")


def test_export_cli(tmp_path):
    m = _tiny()
    torch.save(m.state_dict(), tmp_path / "src.pth")
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("noop")(lambda: None)  # a second command keeps "export" as a subcommand
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "src.pth"), "--format", "safetensors",
                              "--out", str(tmp_path / "o.safetensors")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (tmp_path / "o.safetensors.json").is_file()
    res = runner.invoke(app, ["export", "-c", str(tmp_path / "src.pth"), "-f", "onnx", "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 1 and "--format must be one of" in res.output
    res = runner.invoke(app, ["export", "-c", str(tmp_path / "src.pth"), "-f", "hub", "-o", str(tmp_path / "o.bin")])
    assert res.exit_code == 1 and ".pth" in res.output


# ------------------------------------------------------------------------------------------------
# real dvtrain training checkpoints (DeepSpeed ZeRO-3 on CPU, tiny recipe)


def _train_and_save(rank, world_size, args, out_dir):
    """Two optimizer steps of the tiny recipe, a checkpoint, and the live consolidated backbones."""
    from _dist_utils import make_batch, tiny_recipe

    from dvtrain.train.trainer import Trainer

    trainer = Trainer(tiny_recipe(precision=args["precision"], stage=3))
    for step in range(2):
        trainer.train_step(make_batch(step, offset=4 * rank))
    path = trainer.save_checkpoint(args["root"])
    return {"path": str(path), "teacher": trainer.export_teacher_backbone(), "student": trainer.export_student_backbone()}


def _check_training_checkpoint(tmp_path, res):
    teacher, student = res["teacher"], res["student"]
    assert any((teacher[k] - student[k]).abs().max() > 0 for k in teacher)  # EMA: they differ
    root = tmp_path / "ckpts"
    assert detect_checkpoint_format(root) == "dvtrain-training"
    for which, live in (("teacher", teacher), ("student", student)):
        loaded = load_backbone(root, which=which)
        assert loaded.meta["iteration"] == 2 and loaded.model.embed_dim == 32
        sd = loaded.model.state_dict()
        assert set(sd) == set(live)
        for k, v in live.items():
            assert torch.equal(sd[k], v), k  # bit-identical to the live all-gathered export
    # the eval path the launcher takes after training: recipe + live export -> plain backbone
    from dvtrain.checkpoint.backbone import backbone_from_recipe
    from dvtrain.recipe import load_recipe

    recipe = load_recipe(next(root.glob("iter_*")) / "recipe.yaml")
    plain = backbone_from_recipe(recipe, teacher)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in teacher.items()) and not plain.training
    # the export command end to end: a training checkpoint to a hub file
    export_checkpoint(root, "hub", tmp_path / "t.pth", which="teacher")
    hub = torch.load(tmp_path / "t.pth", weights_only=True)
    assert all(torch.equal(hub[k], teacher[k]) for k in teacher) and all(v.numel() > 0 for v in hub.values())
    cfg = json.loads((tmp_path / "t.pth.json").read_text())
    assert cfg["provenance"]["source_format"] == "dvtrain-training" and cfg["provenance"]["iteration"] == 2


def test_training_checkpoint_one_rank(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.delenv(key, raising=False)  # restored after the test (init_distributed sets them)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    res = _train_and_save(0, 1, {"precision": "bf16", "root": str(tmp_path / "ckpts")}, tmp_path)
    _check_training_checkpoint(tmp_path, res)


@pytest.mark.dist
@pytest.mark.slow
def test_training_checkpoint_two_ranks_consolidated_offline(tmp_path):
    from _dist_utils import run_ranks

    res = run_ranks(__file__, "_train_and_save", 2, tmp_path, {"precision": "fp32", "root": str(tmp_path / "ckpts")})
    assert all(torch.equal(res[0]["teacher"][k], res[1]["teacher"][k]) for k in res[0]["teacher"])
    assert len(list((tmp_path / "ckpts").glob("iter_*/teacher_rank*.pt"))) == 2
    _check_training_checkpoint(tmp_path, res[0])
