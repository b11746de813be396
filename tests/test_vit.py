"""DinoVisionTransformer: sizes, token layout, position resampling, attention/FFN paths, drop path.

Numbers come from facebookresearch/dinov2 (dinov2/models/vision_transformer.py, dinov2/layers/)
and ../shared/reference/dinov2-facts.md.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dvtrain.models import ARCH_SPECS, ARCHS, DinoVisionTransformer, build_backbone
from dvtrain.models import layers as L
from dvtrain.models.vit import resample_pos_embed

torch.set_num_threads(1)


def tiny(**kw):
    """A 2-block vit_tiny (D 192, 3 heads) unless overridden."""
    kw.setdefault("depth", 2)
    return build_backbone("vit_tiny", **kw)


def small_width(**kw):
    """Narrow model for big grids: D 32, 2 heads, 1 block."""
    base = dict(embed_dim=32, depth=1, num_heads=2)
    base.update(kw)
    return DinoVisionTransformer(**base)


# ---------------------------------------------------------------------------------- sizes
def reference_param_count(D, depth, ffn_hidden, swiglu, patch=14, grid=37, registers=0):
    """Closed-form parameter count of the reference DinoVisionTransformer (hub build)."""
    embed = 3 * patch * patch * D + D  # patch_embed.proj
    tokens = D + (grid * grid + 1) * D + D + registers * D  # cls, pos_embed, mask_token, registers
    block = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + D + 2 * D + D  # norms, qkv, proj, ls1, ls2
    h = ffn_hidden
    block += (D * 2 * h + 2 * h + h * D + D) if swiglu else (D * h + h + h * D + D)
    return embed + tokens + depth * block + 2 * D


# arch, ffn, exact count of the 518 px / patch 14 hub model (pos_embed [1, 1370, D])
HUB_COUNTS = [
    ("vit_small", "mlp", 22_056_576),
    ("vit_base", "mlp", 86_580_480),
    ("vit_large", "mlp", 304_368_640),
    ("vit_large", "swiglu", 304_794_880),
    ("vit_giant2", "swiglu", 1_136_480_768),
]


@pytest.mark.parametrize("arch,ffn,expected", HUB_COUNTS)
def test_parameter_counts_match_reference_on_meta(arch, ffn, expected):
    with torch.device("meta"):
        model = build_backbone(arch, img_size=518, patch_size=14, ffn_layer=ffn)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    n = sum(p.numel() for p in model.parameters())
    spec = ARCH_SPECS[arch]
    hidden = 4 * spec["embed_dim"]
    if ffn == "swiglu":
        hidden = L.swiglu_hidden_dim(hidden)
    assert n == reference_param_count(spec["embed_dim"], spec["depth"], hidden, ffn == "swiglu") == expected


def test_arch_specs_and_ffn_widths():
    assert set(ARCHS) == {"vit_small", "vit_base", "vit_large", "vit_giant2"}
    table = {a: (s["embed_dim"], s["depth"], s["num_heads"]) for a, s in ARCH_SPECS.items()}
    assert table == {
        "vit_tiny": (192, 12, 3),
        "vit_small": (384, 12, 6),
        "vit_base": (768, 12, 12),
        "vit_large": (1024, 24, 16),
        "vit_giant2": (1536, 40, 24),
    }
    assert [L.swiglu_hidden_dim(4 * d) for d in (384, 768, 1024, 1536)] == [1024, 2048, 2736, 4096]
    with torch.device("meta"):
        g = build_backbone("vit_giant2", patch_size=14)
        s = build_backbone("vit_small", patch_size=16)
    assert g.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert g.blocks[0].mlp.w3.weight.shape == (1536, 4096)
    assert s.blocks[0].mlp.fc1.weight.shape == (1536, 384)
    assert s.patch_embed.proj.weight.shape == (384, 3, 16, 16)
    assert s.pos_embed.shape == (1, 1 + 14 * 14, 384)


def test_hub_state_dict_key_names():
    model = small_width(num_register_tokens=4, ffn_layer="swiglu")
    keys = set(model.state_dict())
    expected_block = {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.w12.weight", "mlp.w12.bias",
        "mlp.w3.weight", "mlp.w3.bias", "ls2.gamma",
    }  # fmt: skip
    expected = {"cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "norm.weight", "norm.bias"}  # fmt: skip
    expected |= {f"blocks.0.{k}" for k in expected_block}
    assert keys == expected
    assert model.mask_token.shape == (1, 32) and model.register_tokens.shape == (1, 4, 32)
    plain = small_width(layerscale_init=None)
    assert not any("ls1" in k or "ls2" in k for k in plain.state_dict())
    assert "blocks.0.mlp.fc1.weight" in plain.state_dict() and plain.register_tokens is None


def test_reference_initialisation():
    model = tiny(num_register_tokens=4)
    assert model.cls_token.abs().max() < 1e-5 and model.cls_token.std() > 1e-7  # normal(std 1e-6)
    assert model.register_tokens.abs().max() < 1e-5 and model.register_tokens.std() > 1e-7
    assert torch.count_nonzero(model.mask_token) == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.001
    blk = model.blocks[0]
    for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
        assert abs(lin.weight.std().item() - 0.02) < 0.001
        assert torch.count_nonzero(lin.bias) == 0
    assert torch.equal(blk.ls1.gamma, torch.full((192,), 1e-5))
    assert torch.equal(model.norm.weight, torch.ones(192)) and model.norm.eps == 1e-6
    assert blk.norm1.eps == 1e-6
    # the patch conv keeps PyTorch's default: uniform(+-1/sqrt(fan_in)), fan_in 3*14*14
    bound = 1 / math.sqrt(3 * 14 * 14)
    assert model.patch_embed.proj.weight.abs().max() <= bound
    assert model.patch_embed.proj.weight.abs().max() > 0.9 * bound


# ---------------------------------------------------------------------------------- tokens
def test_token_layout_registers_and_mask_token():
    model = small_width(num_register_tokens=4, img_size=56)  # grid 4x4
    with torch.no_grad():
        model.mask_token.normal_()
        model.register_tokens.normal_()
        model.cls_token.normal_()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[1, 15] = True
    tok = model.prepare_tokens_with_masks(x, masks)
    assert tok.shape == (2, 1 + 4 + 16, 32)
    pos = model.pos_embed[0]
    emb = model.patch_embed(x)
    torch.testing.assert_close(tok[:, 0], (model.cls_token[0, 0] + pos[0]).expand(2, -1), rtol=0, atol=0)
    # registers: right after cls, no position added
    assert torch.equal(tok[:, 1:5], model.register_tokens.expand(2, -1, -1))
    patches = tok[:, 5:]
    expected = torch.where(masks[..., None], model.mask_token[None], emb) + pos[1:]
    torch.testing.assert_close(patches, expected, rtol=0, atol=0)


def test_mask_token_gets_gradient_and_patch_embed_still_does():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :8] = True
    out = model.forward_features(x, masks)
    (out["x_norm_patchtokens"].sum() + out["x_norm_clstoken"].sum()).backward()
    assert model.mask_token.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    out = model.forward_features(x, torch.zeros(2, 16, dtype=torch.bool))
    out["x_norm_patchtokens"].sum().backward()
    assert model.mask_token.grad is None or model.mask_token.grad.abs().sum() == 0


def test_224_with_4_registers_gives_261_tokens():
    model = tiny(num_register_tokens=4).eval()
    out = model.forward_features(torch.randn(2, 3, 224, 224))
    assert out["x_prenorm"].shape == (2, 261, 192)
    assert out["x_norm_patchtokens"].shape == (2, 256, 192)
    assert out["x_norm_regtokens"].shape == (2, 4, 192)
    assert out["x_norm_clstoken"].shape == (2, 192)
    assert out["masks"] is None
    torch.testing.assert_close(model(torch.randn(1, 3, 224, 224)).shape, torch.Size([1, 192]))


def test_bad_inputs_are_value_errors():
    model = tiny()
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(torch.randn(1, 3, 224, 220))
    with pytest.raises(ValueError, match=r"\[B, N\] = \[1, 256\]"):
        model.forward_features(torch.randn(1, 3, 224, 224), torch.zeros(1, 100, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="invalid backbone argument"):
        build_backbone("vit_small", embed_dims=3)
    with pytest.raises(ValueError, match="ffn_layer"):
        tiny(ffn_layer="geglu")


# ---------------------------------------------------------------------------------- positions
def test_546_input_on_518_table_gives_39x39_grid():
    model = small_width(img_size=518, num_register_tokens=4).eval()
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 32)
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 546, 546))
    assert out["x_prenorm"].shape == (1, 1 + 4 + 39 * 39, 32)
    assert out["x_norm_patchtokens"].shape == (1, 39 * 39, 32)
    plain = small_width(img_size=518).eval()
    with torch.no_grad():
        assert plain.forward_features(torch.randn(1, 3, 546, 546))["x_prenorm"].shape == (1, 1 + 39 * 39, 32)


def test_nonsquare_448x112_on_16x16_table_rows_along_height():
    model = small_width(img_size=224)  # table 16x16 = 256 tokens, like the 32x8 target
    with torch.no_grad():
        table = torch.zeros(16, 16, 32)
        table[..., 0] = torch.arange(16.0)[:, None]  # channel 0 encodes the row
        table[..., 1] = torch.arange(16.0)[None, :]  # channel 1 encodes the column
        model.pos_embed[0, 1:] = table.reshape(256, 32)
    pos = model.interpolate_pos_encoding((32, 8), torch.float32)
    assert pos.shape == (1, 1 + 32 * 8, 32)
    assert not torch.equal(pos, model.pos_embed)  # no shortcut although 32 * 8 == 256
    grid = pos[0, 1:].reshape(32, 8, 32)
    # rows run along H: channel 0 constant along a row, increasing down the rows; channel 1 mirrored
    torch.testing.assert_close(grid[..., 0], grid[:, :1, 0].expand(32, 8))
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all()
    torch.testing.assert_close(grid[..., 1], grid[:1, :, 1].expand(32, 8))
    # exactly the reference formula: scale factors (32 + 0.1) / 16 and (8 + 0.1) / 16
    ref = F.interpolate(table.permute(2, 0, 1)[None], scale_factor=(32.1 / 16, 8.1 / 16), mode="bicubic")
    torch.testing.assert_close(grid, ref[0].permute(1, 2, 0), rtol=0, atol=0)
    # and in the model
    out = model.get_intermediate_layers(torch.randn(2, 3, 448, 112), n=1, reshape=True)[0]
    assert out.shape == (2, 32, 32, 8)


@pytest.mark.parametrize("side", [16, 37])
def test_offset_form_lands_on_every_grid(side):
    table = torch.randn(1, side * side, 3)
    for h in range(1, 70):
        w = 70 - h
        out = resample_pos_embed(table, (side, side), (h, w), offset=0.1)
        assert out.shape == (1, h * w, 3)
    # it is the scale-factor form, not the size form (those differ)
    a = resample_pos_embed(table, (side, side), (20, 9), offset=0.1)
    src = table.reshape(1, side, side, 3).permute(0, 3, 1, 2)
    sf = F.interpolate(src, scale_factor=(20.1 / side, 9.1 / side), mode="bicubic")
    torch.testing.assert_close(a, sf.permute(0, 2, 3, 1).reshape(1, -1, 3), rtol=0, atol=0)
    sz = F.interpolate(src, size=(20, 9), mode="bicubic")
    assert not torch.allclose(a, sz.permute(0, 2, 3, 1).reshape(1, -1, 3))


def test_size_form_with_antialias_for_register_models():
    model = small_width(img_size=224, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    pos = model.interpolate_pos_encoding((7, 24), torch.float32)
    src = model.pos_embed[0, 1:].reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(src, size=(7, 24), mode="bicubic", antialias=True)
    torch.testing.assert_close(pos[0, 1:], ref[0].permute(1, 2, 0).reshape(-1, 32), rtol=0, atol=0)
    torch.testing.assert_close(pos[0, 0], model.pos_embed[0, 0], rtol=0, atol=0)
    no_aa = F.interpolate(src, size=(7, 24), mode="bicubic", antialias=False)
    assert not torch.allclose(pos[0, 1:], no_aa[0].permute(1, 2, 0).reshape(-1, 32))


def test_token_dtype_follows_the_patch_embedding():
    model = tiny().eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for size in (224, 112):  # table grid and a resampled one: same dtype either way
                assert model.prepare_tokens_with_masks(torch.randn(1, 3, size, size)).dtype == torch.bfloat16
        model.to(torch.bfloat16)  # bf16 parameters, as under DeepSpeed bf16
        for size in (224, 112):
            out = model.forward_features(torch.randn(1, 3, size, size, dtype=torch.bfloat16))
            assert out["x_prenorm"].dtype == torch.bfloat16
            assert torch.isfinite(out["x_norm_clstoken"]).all()


# ---------------------------------------------------------------------------------- forwards
def test_forward_features_list_equals_separate_calls():
    model = tiny(num_register_tokens=4).eval()
    g = torch.randn(4, 3, 56, 56)
    loc = torch.randn(6, 3, 28, 28)
    masks = torch.rand(4, 16) < 0.4
    with torch.no_grad():
        out_g, out_l = model.forward_features([g, loc], [masks, None])
        ref_g = model.forward_features(g, masks)
        ref_l = model.forward_features(loc)
    for got, ref in ((out_g, ref_g), (out_l, ref_l)):
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert out_g["masks"] is masks and out_l["masks"] is None
    with torch.no_grad():  # the module call (what ZeRO-3 needs) takes the same lists
        via_call = model([g, loc], [masks, None], is_training=True)
        cls_only = model([g, loc], [masks, None])
    torch.testing.assert_close(via_call[1]["x_prenorm"], ref_l["x_prenorm"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_only[0], ref_g["x_norm_clstoken"], rtol=1e-5, atol=1e-6)
    assert out_l["x_norm_patchtokens"].shape == (6, 4, 192)
    with pytest.raises(ValueError, match="2 crop batches but 1 masks"):
        model.forward_features_list([g, loc], [masks])


def test_get_intermediate_layers():
    model = tiny(depth=3, num_register_tokens=2).eval()
    x = torch.randn(2, 3, 42, 56)  # grid 3x4
    with torch.no_grad():
        tok = model.prepare_tokens_with_masks(x)
        per_block = []
        for blk in model.blocks:
            tok = blk(tok)
            per_block.append(tok)
        last2 = model.get_intermediate_layers(x, n=2)
        idx = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True, norm=False)
    assert len(last2) == 2
    torch.testing.assert_close(last2[0], model.norm(per_block[1])[:, 3:])
    torch.testing.assert_close(last2[1], model.norm(per_block[2])[:, 3:])
    (p0, c0), (p2, c2) = idx
    assert p0.shape == (2, 192, 3, 4)
    torch.testing.assert_close(p0, per_block[0][:, 3:].reshape(2, 3, 4, 192).permute(0, 3, 1, 2))
    torch.testing.assert_close(c2, per_block[2][:, 0])
    with pytest.raises(ValueError, match=r"n must be in \[1, 3\]"):
        model.get_intermediate_layers(x, n=4)
    with pytest.raises(ValueError, match="block indices"):
        model.get_intermediate_layers(x, n=[3])


# ---------------------------------------------------------------------------------- attention
def test_attention_dispatch_decision():
    sel = L.select_attn_impl
    assert sel("auto", is_cuda=True, xformers_available=True) == "xformers"
    assert sel("auto", is_cuda=False, xformers_available=True) == "sdpa"  # never xformers on CPU
    assert sel("auto", is_cuda=True, xformers_available=False) == "sdpa"
    assert sel("xformers", is_cuda=False, xformers_available=True) == "sdpa"
    assert sel("sdpa", is_cuda=True, xformers_available=True) == "sdpa"
    assert sel("math", is_cuda=True, xformers_available=True) == "math"
    with pytest.raises(ValueError, match="not installed"):
        sel("xformers", is_cuda=True, xformers_available=False)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        sel("flash", is_cuda=True, xformers_available=True)


def test_auto_attention_runs_on_cpu_whatever_xformers_state():
    # the venv may carry xformers (possibly without its CUDA extensions): CPU must use SDPA and work
    model = tiny(attn_impl="auto").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 28, 28))).all()


def test_explicit_xformers_request_on_cpu():
    if L.xformers_ops() is None:
        with pytest.raises(ValueError, match="not installed"):
            L.Attention(24, 3, attn_impl="xformers")
        return
    xf, sdpa = L.Attention(24, 3, attn_impl="xformers"), L.Attention(24, 3, attn_impl="sdpa")
    sdpa.load_state_dict(xf.state_dict())
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(xf(x), sdpa(x), rtol=0, atol=0)  # CPU: SDPA, no xformers call


def test_math_attention_equals_softmax_definition_and_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 3, 17, 8, dtype=torch.float64).unbind(0)
    ref = torch.einsum("bhnm,bhmk->bhnk", torch.softmax(torch.einsum("bhnk,bhmk->bhnm", q, k) / 8**0.5, -1), v)
    torch.testing.assert_close(L.math_attention(q, k, v), ref, rtol=1e-12, atol=1e-12)
    attn_sdpa = L.Attention(24, 3, attn_impl="sdpa")
    attn_math = L.Attention(24, 3, attn_impl="math")
    attn_math.load_state_dict(attn_sdpa.state_dict())
    x = torch.randn(2, 17, 24)
    torch.testing.assert_close(attn_sdpa(x), attn_math(x), rtol=1e-5, atol=1e-6)
    # qkv row layout: q rows, then k rows, then v rows, heads contiguous (hub layout)
    W = attn_sdpa.qkv.weight
    xq, xk, xv = (x @ W[i * 24 : (i + 1) * 24].T + attn_sdpa.qkv.bias[i * 24 : (i + 1) * 24] for i in range(3))
    split = lambda t: t.reshape(2, 17, 3, 8).transpose(1, 2)  # noqa: E731
    o = torch.softmax(split(xq) @ split(xk).transpose(-1, -2) / 8**0.5, -1) @ split(xv)
    torch.testing.assert_close(attn_sdpa(x), attn_sdpa.proj(o.transpose(1, 2).reshape(2, 17, 24)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- FFN
def test_swiglu_ffn_math_and_layout():
    ffn = L.SwiGLUFFN(16, 24)
    x = torch.randn(3, 5, 16)
    w12, b12 = ffn.w12.weight, ffn.w12.bias
    gate = x @ w12[:24].T + b12[:24]  # gate rows first
    up = x @ w12[24:].T + b12[24:]
    torch.testing.assert_close(ffn(x), ffn.w3(F.silu(gate) * up))


def test_swiglu_kernel_module_agrees_with_pure_torch_when_present():
    kernel = L.fused_swiglu()
    if kernel is None:
        pytest.skip("dvtrain.kernels.swiglu not present yet: the pure-torch path is the only one")
    x12 = torch.randn(4, 7, 2 * 24)
    x1, x2 = x12.chunk(2, -1)
    torch.testing.assert_close(kernel(x12), F.silu(x1) * x2)


# ---------------------------------------------------------------------------------- drop path
def test_drop_path_per_sample():
    x = torch.ones(4000, 2, 3)
    out = L.drop_path(x, 0.25, training=True)
    per_sample = out[:, 0, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}  # fp32 1/keep
    assert (out == per_sample[:, None, None]).all()  # whole samples
    assert abs((per_sample > 0).float().mean().item() - 0.75) < 0.03
    assert torch.equal(L.drop_path(x, 0.25, training=False), x)


def test_sample_subset_stochastic_depth_exact():
    x = torch.zeros(8, 3, 2)
    out = L.drop_add_residual_stochastic_depth(x, lambda t: torch.ones_like(t), 0.4)
    rows = out.flatten(1)
    # subset = int(8 * 0.6) = 4 samples get residual 1 * (8 / 4); the other 4 pass unchanged
    assert (rows == 2.0).all(1).sum() == 4 and (rows == 0.0).all(1).sum() == 4


@pytest.mark.parametrize(
    "rate,train,expected_batch", [(0.3, True, 7), (0.4, True, 6), (0.1, True, 10), (0.3, False, 10)]
)
def test_block_uses_subset_variant_only_above_0_1(rate, train, expected_batch):
    blk = L.Block(24, 3, drop_path=rate)
    blk.train(train)
    seen = []
    blk.attn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    blk.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    blk(torch.randn(10, 5, 24))
    assert seen == [expected_batch, expected_batch]


def test_uniform_drop_path_rate_in_every_block():
    model = tiny(depth=4, drop_path_rate=0.3)
    assert [b.sample_drop_ratio for b in model.blocks] == [0.3] * 4


# ---------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_activation_checkpointing_same_gradients(drop_path_rate):
    torch.manual_seed(3)
    ref = tiny(drop_path_rate=drop_path_rate, num_register_tokens=4).train()
    ckpt = tiny(drop_path_rate=drop_path_rate, num_register_tokens=4, activation_checkpointing=True).train()
    ckpt.load_state_dict(ref.state_dict())
    x = [torch.randn(4, 3, 42, 42), torch.randn(6, 3, 28, 28)]
    grads = []
    for model in (ref, ckpt):
        torch.manual_seed(11)
        outs = model.forward_features_list(x, [torch.rand(4, 9) < 0.3, None])
        sum(o["x_norm_clstoken"].pow(2).sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------- GPU paths
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_attention_impls_agree(dtype):
    attn = {impl: L.Attention(64, 4, attn_impl=impl).cuda().to(dtype) for impl in ("math", "sdpa", "auto")}
    for impl in ("sdpa", "auto"):
        attn[impl].load_state_dict(attn["math"].state_dict())
    x = torch.randn(3, 261, 64, device="cuda", dtype=dtype)
    tol = dict(rtol=0, atol=2e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    ref = attn["math"](x)
    torch.testing.assert_close(attn["sdpa"](x), ref, **tol)
    torch.testing.assert_close(attn["auto"](x), ref, **tol)  # xformers when it is usable, else SDPA


@pytest.mark.gpu
def test_cuda_swiglu_ffn_kernel_path_matches_cpu_path():
    ffn = L.SwiGLUFFN(64, 88)
    x = torch.randn(4, 50, 64)
    ref = ffn(x)
    out = ffn.cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_forward_backward_with_checkpointing():
    model = tiny(ffn_layer="swiglu", num_register_tokens=4, drop_path_rate=0.3, activation_checkpointing=True)
    model = model.cuda().train()
    g = torch.randn(4, 3, 224, 224, device="cuda")
    loc = torch.randn(8, 3, 98, 98, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = model.forward_features_list([g, loc], [torch.rand(4, 256, device="cuda") < 0.3, None])
        loss = sum(o["x_norm_clstoken"].float().square().mean() for o in outs)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
