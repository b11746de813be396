"""SSLMetaArch on a tiny ViT: loss terms vs an explicit per-pair computation, gradients, teacher isolation.

Reference: dinov2/train/ssl_meta_arch.py (forward_backward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dvtrain.data.augment import MultiCropAugmentation
from dvtrain.data.collate import collate_multicrop
from dvtrain.data.masking import MaskingGenerator
from dvtrain.kernels.koleo import koleo_loss_reference
from dvtrain.train.meta_arch import LOSS_KEYS, MetaArchConfig, SSLMetaArch

B, N_LOCAL, G, L, P = 4, 2, 28, 14, 7  # 4x4 patches per global crop, 2x2 per local crop
TEMP = 0.04


def _cfg(**kw):
    # layerscale_init=1.0: with the training init 1e-5 every CLS output is ~norm(cls + pos_0), the
    # same for all images, and a wrong crop pairing would go unnoticed.
    base = dict(
        arch="vit_tiny", backbone_overrides=dict(img_size=G, patch_size=P, depth=2, layerscale_init=1.0),
        dino_head_n_prototypes=32, dino_head_hidden_dim=16, dino_head_bottleneck_dim=8,
        ibot_head_n_prototypes=24, ibot_head_hidden_dim=16, ibot_head_bottleneck_dim=8,
        num_local_crops=N_LOCAL,
    )
    base.update(kw)
    return MetaArchConfig(**base)


def _batch(seed=0, mask_probability=0.5):
    g = torch.Generator().manual_seed(seed)
    aug = MultiCropAugmentation(G, L, N_LOCAL)
    images = [torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8, generator=g) for _ in range(B)]
    torch.manual_seed(seed)
    samples = [aug(im) for im in images]
    return collate_multicrop(
        samples, mask_ratio_min_max=(0.1, 0.5), mask_probability=mask_probability,
        mask_generator=MaskingGenerator((G // P, G // P)), generator=g,
    )


def _ce(t, s):
    return -torch.sum(t * F.log_softmax(s.float() / 0.1, dim=-1), dim=-1)


def test_loss_terms_match_explicit_pairing():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg()).train()
    batch = _batch()
    losses = model(batch, teacher_temp=TEMP)
    assert set(losses) == set(LOSS_KEYS) | {"total"}

    with torch.no_grad():
        gc, lc, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
        t_out = model.teacher.backbone.forward_features(gc)
        t_probs = F.softmax(model.teacher.dino_head(t_out["x_norm_clstoken"]) / TEMP, dim=-1)  # center is 0
        tp0, tp1 = t_probs[:B], t_probs[B:]
        assert not torch.allclose(tp0, tp1, atol=1e-3)  # the pairing check below can fail
        s_glob = model.student.backbone.forward_features(gc, masks)
        s_loc = model.student.backbone.forward_features(lc)
        s_logits = model.student.dino_head(s_glob["x_norm_clstoken"])
        l_logits = model.student.dino_head(s_loc["x_norm_clstoken"])
        n_terms = 2 + 2 * N_LOCAL
        # each student global crop meets the *other* teacher crop
        glob = (_ce(tp1, s_logits[:B]).mean() + _ce(tp0, s_logits[B:]).mean()) / n_terms
        loc = sum(_ce(tp, l_logits[j * B:(j + 1) * B]).mean() for j in range(N_LOCAL) for tp in (tp0, tp1)) / n_terms
        koleo = sum(koleo_loss_reference(c) for c in s_glob["x_norm_clstoken"].chunk(2))
        # iBOT: mean over each masked image's masked tokens, summed, / 2B
        t_patch = F.softmax(model.teacher.dino_head(t_out["x_norm_patchtokens"]) / TEMP, dim=-1)
        s_patch = model.student.dino_head(s_glob["x_norm_patchtokens"])
        per_token = _ce(t_patch, s_patch)  # [2B, N]
        ibot = sum(per_token[i][masks[i]].mean() for i in range(2 * B) if masks[i].any()) / (2 * B)

    assert losses["dino_global_crops_loss"].item() == pytest.approx(glob.item(), rel=1e-5)
    assert losses["dino_local_crops_loss"].item() == pytest.approx(loc.item(), rel=1e-5)
    assert losses["koleo_loss"].item() == pytest.approx(koleo.item(), rel=1e-5)
    assert losses["ibot_loss"].item() == pytest.approx(ibot.item(), rel=1e-5)
    total = glob + loc + 0.1 * koleo + ibot
    assert losses["total"].item() == pytest.approx(total.item(), rel=1e-5)


@pytest.mark.parametrize(
    "cfg_kw", [{}, {"ibot_separate_head": True, "centering": "sinkhorn_knopp"}], ids=["shared_centering", "separate_sk"]
)
def test_one_batch_gradients_and_teacher_isolation(cfg_kw):
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg(**cfg_kw)).train()
    assert not model.teacher.training and model.student.training
    s_ptrs = {p.data_ptr() for p in model.student.parameters()}
    t_ptrs = {p.data_ptr() for p in model.teacher.parameters()}
    assert not s_ptrs & t_ptrs  # own storage
    for (ns, ps), (nt, pt) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert ns == nt and torch.equal(ps, pt) and not pt.requires_grad

    losses = model(_batch(), teacher_temp=TEMP)
    for key, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), key
    losses["total"].backward()
    for name, p in model.student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches student.{name}"
    assert all(p.grad is None for p in model.teacher.parameters())
    if cfg_kw.get("ibot_separate_head"):
        assert "ibot_head" in model.student and "ibot_head" in model.teacher
    groups = model.param_groups(lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.student.parameters()}


def test_mask_token_learns_only_when_masks_exist():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg()).train()
    model(_batch(mask_probability=0.0), teacher_temp=TEMP)["total"].backward()
    grad = model.student.backbone.mask_token.grad
    assert grad is None or not grad.any()
    assert model.student.backbone.cls_token.grad.any()


def test_center_update_protocol():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg()).train()
    batch = _batch()
    with torch.no_grad():
        t_logits = model.teacher.dino_head(
            model.teacher.backbone.forward_features(batch["collated_global_crops"])["x_norm_clstoken"]
        )
    model(batch, teacher_temp=TEMP)
    assert not model.dino_loss.center.any() and not model.ibot_patch_loss.center.any()  # pending only
    model.apply_center_update()
    assert torch.allclose(model.dino_loss.center, 0.1 * t_logits.mean(0, keepdim=True), atol=1e-6)
    assert model.ibot_patch_loss.center.abs().sum() > 0
    state = model.state_dict()
    assert "dino_loss.center" in state and "ibot_patch_loss.center" in state


def test_update_teacher_ema():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.75)
    for t_old, t_new, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t_new, 0.75 * t_old + 0.25 * s, atol=1e-6)


def test_no_local_crops_and_no_ibot():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg(num_local_crops=0, ibot_loss_weight=0.0, koleo_loss_weight=0.0))
    batch = _batch()
    losses = model(batch, teacher_temp=TEMP)
    assert set(losses) == {"dino_global_crops_loss", "total"}
    assert losses["total"].item() == pytest.approx(losses["dino_global_crops_loss"].item())


def test_config_and_batch_errors():
    with pytest.raises(ValueError, match="num_global_crops"):
        SSLMetaArch(_cfg(num_global_crops=3))
    with pytest.raises(ValueError, match="centering"):
        SSLMetaArch(_cfg(centering="mean"))
    with pytest.raises(ValueError, match="nothing to train"):
        SSLMetaArch(_cfg(dino_loss_weight=0.0, ibot_loss_weight=0.0))
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg())
    batch = _batch()
    batch["collated_local_crops"] = batch["collated_local_crops"][:3]
    with pytest.raises(ValueError, match="num_local_crops"):
        model(batch, teacher_temp=TEMP)


@pytest.mark.gpu
def test_forward_backward_on_cuda_bf16_autocast():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg()).cuda().train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _batch().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(batch, teacher_temp=TEMP)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    losses["total"].backward()
    assert all(p.grad is not None for p in model.student.parameters())
    model.apply_center_update()
    assert model.dino_loss.center.is_cuda and model.dino_loss.center.abs().sum() > 0
