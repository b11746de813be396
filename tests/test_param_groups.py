"""Parameter groups on a real tiny ViT + DINO head (dinov2/utils/param_groups.py rules)."""

from __future__ import annotations

import pytest
import torch

from dvtrain.models.heads import DINOHead
from dvtrain.models.vit import build_backbone
from dvtrain.train.param_groups import apply_schedule_to_param_groups, build_param_groups, param_multipliers


@pytest.fixture(scope="module")
def student():
    backbone = build_backbone("vit_tiny", img_size=28, patch_size=7, depth=2, num_register_tokens=4)
    head = DINOHead(backbone.embed_dim, 16, hidden_dim=8, bottleneck_dim=4, nlayers=3)
    return {"backbone": backbone, "dino_head": head}


def _lookup(groups):
    return {name: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups for name in g["names"]}


def test_exact_multipliers_tiny_vit(student):
    groups = build_param_groups(student, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    by_name = _lookup(groups)
    n_params = sum(1 for m in student.values() for _ in m.parameters())
    assert len(by_name) == n_params  # every trainable parameter exactly once
    # L = 2 blocks: layer 0 -> 0.9^3, block i -> 0.9^(2 - i), final norm / heads -> 1
    expected = {
        "backbone.cls_token": (0.729, 0.0, False),
        "backbone.pos_embed": (0.729, 0.0, False),
        "backbone.mask_token": (0.729, 0.0, False),
        "backbone.register_tokens": (0.729, 0.0, False),
        "backbone.patch_embed.proj.weight": (0.729 * 0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.729 * 0.2, 0.0, False),
        "backbone.blocks.0.attn.qkv.weight": (0.81, 1.0, False),
        "backbone.blocks.0.attn.qkv.bias": (0.81, 0.0, False),
        "backbone.blocks.0.norm1.weight": (0.81, 0.0, False),
        "backbone.blocks.0.ls1.gamma": (0.81, 0.0, False),
        "backbone.blocks.1.mlp.fc2.weight": (0.9, 1.0, False),
        "backbone.blocks.1.ls2.gamma": (0.9, 0.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "backbone.norm.bias": (1.0, 0.0, False),
        "dino_head.mlp.0.weight": (1.0, 1.0, False),
        "dino_head.mlp.0.bias": (1.0, 0.0, False),
        "dino_head.last_layer.weight_v": (1.0, 1.0, True),
        "dino_head.last_layer.weight_g": (1.0, 1.0, True),
    }
    for name, (lr_mult, wd_mult, last) in expected.items():
        got = by_name[name]
        assert got[0] == pytest.approx(lr_mult, rel=1e-12) and got[1:] == (wd_mult, last), name
    # groups are fused: one per distinct (lr, wd, last) triple
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys)) == 10
    assert [g["is_last_layer"] for g in groups].count(True) == 1


def test_decay_off_gives_few_groups(student):
    groups = build_param_groups(student, lr_decay_rate=1.0, patch_embed_lr_mult=0.2)
    keys = sorted((g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups)
    assert keys == [(0.2, 0.0, False), (0.2, 1.0, False), (1.0, 0.0, False), (1.0, 1.0, False), (1.0, 1.0, True)]


def test_frozen_parameters_are_left_out():
    head = DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4, nlayers=1)
    head.last_layer.weight_g.requires_grad_(False)
    names = [n for g in build_param_groups({"h": head}) for n in g["names"]]
    assert "h.last_layer.weight_g" not in names and "h.last_layer.weight_v" in names


def test_apply_schedule_sets_lr_and_wd(student):
    groups = build_param_groups(student, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    apply_schedule_to_param_groups(opt.param_groups, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected_lr) and g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    with pytest.raises(ValueError, match="lr_multiplier"):
        apply_schedule_to_param_groups([{"params": []}], 1.0, 1.0, 1.0)


def test_param_multipliers_head_and_errors():
    assert param_multipliers("mlp.0.weight", None, 0.5, 0.2) == {
        "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False,
    }
    with pytest.raises(ValueError, match="lr_decay_rate"):
        build_param_groups({}, lr_decay_rate=0.0)
