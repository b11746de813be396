"""Checkpoint interop: dinov2 hub state dicts and the real Hugging Face transformers Dinov2 models."""

import logging

import pytest
import torch

from dvtrain.models import DinoVisionTransformer
from dvtrain.models.convert import (
    build_from_hub,
    from_hf,
    hub_backbone_kwargs,
    load_hub_state_dict,
    to_hf_state_dict,
    unchunk_block_keys,
)
from dvtrain.models.vit import resample_pos_embed

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

D, HEADS, DEPTH = 32, 4, 2


def ours(**kw):
    base = dict(img_size=224, patch_size=14, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    base.update(kw)
    model = DinoVisionTransformer(**base)
    randomize(model)
    return model.eval()


@torch.no_grad()
def randomize(module, scale=0.2):
    """Every parameter random (norms around 1) so each key mapping changes the output."""
    for name, p in module.named_parameters():
        base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight")) else 0.0
        p.copy_(base + scale * torch.randn_like(p))


def features(model, x):
    out = model.forward_features(x)
    seq = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)
    return seq, out["x_norm_clstoken"]


def chunked(sd, chunk_size):
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // chunk_size}.{k[len('blocks.'):]}"
        out[k] = v
    return out


# ============================================================================== hub format
def test_unchunk_block_keys():
    sd = {"blocks.0.3.attn.qkv.weight": 1, "blocks.1.7.norm1.bias": 2, "blocks.2.ls1.gamma": 3, "norm.weight": 4}
    assert unchunk_block_keys(sd) == {
        "blocks.3.attn.qkv.weight": 1, "blocks.7.norm1.bias": 2, "blocks.2.ls1.gamma": 3, "norm.weight": 4,
    }  # fmt: skip
    with pytest.raises(ValueError, match="both chunked and plain"):
        unchunk_block_keys({"blocks.0.1.norm1.bias": 1, "blocks.1.norm1.bias": 2})


@pytest.mark.parametrize("registers,ffn", [(0, "mlp"), (4, "swiglu")])
def test_hub_state_dict_roundtrip_with_chunked_keys(registers, ffn):
    src = ours(num_register_tokens=registers, ffn_layer=ffn, depth=4)
    sd = chunked(src.state_dict(), chunk_size=2)
    assert "blocks.1.3.mlp." + ("w12.weight" if ffn == "swiglu" else "fc1.weight") in sd
    dst = DinoVisionTransformer(img_size=224, patch_size=14, embed_dim=D, depth=4, num_heads=HEADS,
                                num_register_tokens=registers, ffn_layer=ffn).eval()  # fmt: skip
    load_hub_state_dict(dst, sd)
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        torch.testing.assert_close(features(dst, x)[0], features(src, x)[0], rtol=0, atol=0)


def test_hub_pos_embed_of_other_grid_is_resampled_and_logged(caplog):
    src = ours(img_size=518)  # 37x37 table, like the hub files
    dst = DinoVisionTransformer(img_size=224, patch_size=14, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    with caplog.at_level(logging.INFO, logger="dvtrain.models.convert"):
        load_hub_state_dict(dst, src.state_dict())
    assert "resampled checkpoint pos_embed from a 37x37 to a 16x16 grid" in caplog.text
    expected = resample_pos_embed(src.pos_embed[:, 1:], (37, 37), (16, 16), offset=0.1)
    torch.testing.assert_close(dst.pos_embed[:, 1:], expected, rtol=0, atol=0)
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight, rtol=0, atol=0)


def test_hub_structural_mismatches_are_clear_errors():
    reg = ours(num_register_tokens=4).state_dict()
    plain = ours().state_dict()
    with pytest.raises(ValueError, match="4 register tokens but the model has num_register_tokens=0"):
        load_hub_state_dict(ours(), reg)
    with pytest.raises(ValueError, match="0 register tokens but the model has num_register_tokens=4"):
        load_hub_state_dict(ours(num_register_tokens=4), plain)
    with pytest.raises(ValueError, match="layerscale_init"):
        load_hub_state_dict(ours(layerscale_init=None), plain)
    with pytest.raises(ValueError, match="checkpoint FFN is 'mlp' but the model has ffn_layer='swiglu'"):
        load_hub_state_dict(ours(ffn_layer="swiglu"), plain)
    extra = dict(plain, **{"head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['head.weight'\]"):
        load_hub_state_dict(ours(), extra)
    missing = {k: v for k, v in plain.items() if k != "mask_token"}
    with pytest.raises(ValueError, match=r"missing \['mask_token'\]"):
        load_hub_state_dict(ours(), missing)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_hub_state_dict(ours(depth=DEPTH, mlp_ratio=2.0), plain)


def test_build_from_hub_infers_architecture():
    src = ours(img_size=518, num_register_tokens=4, ffn_layer="swiglu", depth=3,
               interpolate_offset=0.0, interpolate_antialias=True)  # fmt: skip
    sd = {"backbone." + k: v for k, v in chunked(src.state_dict(), 3).items()}  # training-checkpoint style
    kw = hub_backbone_kwargs({k[len("backbone."):]: v for k, v in sd.items()})
    assert kw["img_size"] == 518 and kw["patch_size"] == 14 and kw["depth"] == 3 and kw["embed_dim"] == D
    assert kw["ffn_layer"] == "swiglu" and kw["mlp_ratio"] == 4.0 and kw["num_register_tokens"] == 4
    assert (kw["interpolate_offset"], kw["interpolate_antialias"]) == (0.0, True)  # register hub models
    model = build_from_hub(sd, prefix="backbone.", num_heads=HEADS).eval()
    x = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(features(model, x)[0], features(src, x)[0], rtol=0, atol=0)
    assert hub_backbone_kwargs(ours().state_dict())["interpolate_offset"] == 0.1


# ============================================================================== Hugging Face
def hf_model(registers, swiglu, qkv_bias=True):
    cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    extra = {"num_register_tokens": registers} if registers else {}
    cfg = cls(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=224, patch_size=14,
              use_swiglu_ffn=swiglu, qkv_bias=qkv_bias, attn_implementation="eager", **extra)  # fmt: skip
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    model = model_cls(cfg).eval()
    randomize(model)
    return model


SIZES = [(224, 224), (168, 112)]  # the table's own size, and a non-square resampled grid (12 x 8)
CASES = [(0, False), (0, True), (4, False), (4, True)]


@pytest.mark.parametrize("registers,swiglu", CASES)
def test_from_hf_matches_hf_outputs(registers, swiglu):
    hf = hf_model(registers, swiglu)
    model = from_hf(hf).eval()
    assert model.num_register_tokens == registers and model.ffn_layer == ("swiglu" if swiglu else "mlp")
    # HF interpolation = explicit size; antialias only with registers. from_hf copies that mode.
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.0, bool(registers))
    for H, W in SIZES:
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            ref = hf(pixel_values=x)
            seq, pooled = features(model, x)
        assert seq.shape == ref.last_hidden_state.shape == (2, 1 + registers + (H // 14) * (W // 14), D)
        torch.testing.assert_close(seq, ref.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, ref.pooler_output, rtol=0, atol=1e-5)


@pytest.mark.parametrize("registers,swiglu", CASES)
def test_to_hf_matches_our_outputs(registers, swiglu):
    model = ours(num_register_tokens=registers, ffn_layer="swiglu" if swiglu else "mlp",
                 interpolate_offset=0.0, interpolate_antialias=bool(registers))  # fmt: skip
    cfg, sd = to_hf_state_dict(model)
    assert cfg["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
    config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    config = config_cls(**{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation="eager")
    hf = model_cls(config).eval()
    hf.load_state_dict(sd, strict=True)
    for H, W in SIZES:
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            ref = hf(pixel_values=x)
            seq, pooled = features(model, x)
        torch.testing.assert_close(ref.last_hidden_state, seq, rtol=0, atol=1e-5)
        torch.testing.assert_close(ref.pooler_output, pooled, rtol=0, atol=1e-5)
    # and back: the round trip is the identity on our state dict
    back = from_hf(sd, cfg, interpolate_offset=model.interpolate_offset)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_swiglu_hidden_size_rule_is_the_same_in_hf():
    hf = hf_model(0, True)
    model = from_hf(hf)
    # D 32, mlp_ratio 4: int(128 * 2 / 3) = 85 -> rounded up to a multiple of 8 = 88 in both
    assert hf.encoder.layer[0].mlp.weights_out.in_features == 88
    assert model.blocks[0].mlp.w3.in_features == 88
    assert hf.encoder.layer[0].mlp.weights_in.out_features == model.blocks[0].mlp.w12.out_features == 176


def test_reference_offset_model_exports_exactly_at_table_size(caplog):
    model = ours()  # reference default: offset 0.1 scale-factor resampling
    with caplog.at_level(logging.WARNING, logger="dvtrain.models.convert"):
        cfg, sd = to_hf_state_dict(model)
    assert "outputs agree at 224 px, differ slightly at other resolutions" in caplog.text
    hf = transformers.Dinov2Model(transformers.Dinov2Config(**cfg, attn_implementation="eager")).eval()
    hf.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, features(model, x)[0], rtol=0, atol=1e-5)


def test_to_hf_fills_layerscale_and_biases_hf_always_has():
    model = ours(layerscale_init=None, proj_bias=False, ffn_bias=False, qkv_bias=False, interpolate_offset=0.0)
    cfg, sd = to_hf_state_dict(model)
    assert torch.equal(sd["encoder.layer.0.layer_scale1.lambda1"], torch.ones(D))
    assert torch.count_nonzero(sd["encoder.layer.1.mlp.fc2.bias"]) == 0
    assert "encoder.layer.0.attention.attention.query.bias" not in sd and cfg["qkv_bias"] is False
    hf = transformers.Dinov2Model(transformers.Dinov2Config(**cfg, attn_implementation="eager")).eval()
    hf.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 168, 112)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, features(model, x)[0], rtol=0, atol=1e-5)


def test_from_hf_state_dict_with_prefix_and_errors():
    hf = hf_model(0, False, qkv_bias=False)
    sd = {"dinov2." + k: v for k, v in hf.state_dict().items()}  # e.g. Dinov2ForImageClassification
    model = from_hf(sd, hf.config.to_dict()).eval()
    assert model.blocks[0].attn.qkv.bias is None
    x = torch.randn(1, 3, 112, 168)
    with torch.no_grad():
        torch.testing.assert_close(features(model, x)[0], hf(pixel_values=x).last_hidden_state, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the HF config"):
        from_hf(hf.state_dict())
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        from_hf(hf.state_dict(), dict(hf.config.to_dict(), hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="does not match its config"):
        from_hf(hf.state_dict(), dict(hf.config.to_dict(), num_hidden_layers=3))
