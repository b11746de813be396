"""Linear probes: grid enumeration, head inputs, SGD arithmetic vs torch.optim, separable data."""

import math

import pytest
import torch

from dvtrain.eval.features import Features, extract_features, iter_batches
from dvtrain.eval.linear import (
    DEFAULT_LEARNING_RATES,
    ProbeConfig,
    fit_linear_heads,
    linear_eval_backbone,
    linear_input,
    probe_configs,
    train_linear_probes,
)


def test_grid_enumeration_matches_reference_order():
    configs = probe_configs()
    assert len(configs) == 2 * 2 * 13
    assert DEFAULT_LEARNING_RATES == (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
    expected = [ProbeConfig(n, a, lr) for n in (1, 4) for a in (False, True) for lr in DEFAULT_LEARNING_RATES]
    assert configs == expected
    assert len({c.name for c in configs}) == 52
    small = probe_configs((1, 2), (True,), (0.1, 0.01))
    assert [c.name for c in small] == [
        "blocks1_avgpool_lr0.1", "blocks1_avgpool_lr0.01", "blocks2_avgpool_lr0.1", "blocks2_avgpool_lr0.01",
    ]
    with pytest.raises(ValueError, match="duplicate"):
        probe_configs((1, 1))
    with pytest.raises(ValueError, match="> 0"):
        probe_configs(learning_rates=(0.0,))


def test_linear_input_is_reference_create_linear_input():
    vit = pytest.importorskip("dvtrain.models.vit")
    model = vit.build_backbone("vit_tiny", img_size=28, patch_size=14, depth=5, num_register_tokens=2).eval()
    images = torch.randn(6, 3, 28, 28)
    feats = extract_features(model, iter_batches(images, torch.arange(6), 4), n_last_blocks=4)
    with torch.no_grad():
        outs = model.get_intermediate_layers(images, 4, return_class_token=True)
    for n in (1, 4):
        # reference: torch.cat of class tokens of outputs[-n:], then mean of outputs[-1] patch tokens
        ref = torch.cat([c for _, c in outs[-n:]], dim=-1)
        torch.testing.assert_close(linear_input(feats, n, False), ref, rtol=1e-5, atol=1e-5)
        ref_pool = torch.cat((ref, outs[-1][0].mean(dim=1)), dim=-1)
        torch.testing.assert_close(linear_input(feats, n, True), ref_pool, rtol=1e-5, atol=1e-5)
    assert linear_input(feats, 4, True).shape == (6, 5 * model.embed_dim)
    with pytest.raises(ValueError, match="only 4 blocks"):
        linear_input(feats, 5, False)


def test_vectorised_sgd_equals_torch_sgd_with_cosine_schedule():
    g = torch.Generator().manual_seed(0)
    N, D, C = 50, 6, 3
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    lrs = torch.tensor([0.5, 0.05, 0.002])
    epochs, bs = 3, 16
    perms = [torch.randperm(N, generator=g) for _ in range(epochs)]
    w0 = torch.randn(len(lrs), C, D, generator=g) * 0.01
    with torch.no_grad():  # must still train (grad re-enabled inside)
        W, b = fit_linear_heads(x, y, lrs, w0, perms, bs)
    steps = epochs * math.ceil(N / bs)
    for i, lr in enumerate(lrs.tolist()):
        head = torch.nn.Linear(D, C)
        with torch.no_grad():
            head.weight.copy_(w0[i])
            head.bias.zero_()
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0)
        for perm in perms:
            for s in range(0, N, bs):
                idx = perm[s : s + bs]
                loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        torch.testing.assert_close(W[i].T, head.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[i], head.bias.detach(), rtol=1e-5, atol=1e-6)
        assert (W[i].T - w0[i]).abs().max() > 1e-3 * lr  # it moved


def test_probe_results_follow_the_heads():
    g = torch.Generator().manual_seed(0)
    feats = Features(torch.randn(30, 1, 4, generator=g), torch.randn(30, 4, generator=g), torch.arange(30) % 3)
    out = train_linear_probes(feats, feats, probe_configs((1,), (False,), (0.5,)), epochs=2, batch_size=8, seed=3)
    # replay the documented seeding: perms first, then one init per input group
    gen = torch.Generator().manual_seed(3)
    perms = [torch.randperm(30, generator=gen) for _ in range(2)]
    w0 = torch.randn(1, 3, 4, generator=gen) * 0.01
    W, b = fit_linear_heads(feats.cls_NLD[:, 0], feats.labels_N, torch.tensor([0.5 * 8 / 256]), w0, perms, 8)
    logits = feats.cls_NLD[:, 0] @ W[0] + b[0]
    acc = (logits.argmax(1) == feats.labels_N).double().mean().item() * 100
    assert out["configs"]["blocks1_cls_lr0.5"]["top1"] == pytest.approx(acc)
    assert out["steps"] == 2 * 4 and out["configs"]["blocks1_cls_lr0.5"]["lr"] == pytest.approx(0.5 * 8 / 256)


def _separable(n, C, D, gen):
    y = torch.arange(n) % C
    centers = torch.eye(C, D) * 4.0
    x = centers[y] + 0.3 * torch.randn(n, D, generator=gen)
    return x, y


def test_linearly_separable_features_reach_100_percent():
    gen = torch.Generator().manual_seed(0)
    C, D = 4, 8
    xtr, ytr = _separable(400, C, D, gen)
    xva, yva = _separable(200, C, D, gen)
    # CLS of 2 "blocks": block -2 is pure noise, the last block carries the classes
    tr = Features(torch.stack([torch.randn(400, D, generator=gen), xtr], 1), torch.randn(400, D, generator=gen), ytr)
    va = Features(torch.stack([torch.randn(200, D, generator=gen), xva], 1), torch.randn(200, D, generator=gen), yva)
    out = train_linear_probes(tr, va, probe_configs((1, 2), (False, True), (1e-5, 0.1)), epochs=5, batch_size=32)
    assert out["best"]["top1"] == 100.0 and out["best"]["name"] == "blocks1_cls_lr0.1"
    assert out["configs"]["blocks1_cls_lr0.1"]["top5"] == 100.0  # top-4 of 4 classes
    assert out["top5_n"] == 4
    # lr 1e-5 (effective 1.25e-6) barely moves the N(0, 0.01) init: far from perfect
    assert out["configs"]["blocks1_cls_lr1e-05"]["top1"] < 90.0
    assert list(out["configs"]) == [c.name for c in probe_configs((1, 2), (False, True), (1e-5, 0.1))]


def test_backbone_grid_on_images_and_depth_clamp():
    vit = pytest.importorskip("dvtrain.models.vit")
    model = vit.build_backbone("vit_tiny", img_size=28, patch_size=14, depth=2)
    gen = torch.Generator().manual_seed(0)
    # two visually distinct classes: bright vs dark images
    y = torch.arange(40) % 2
    images = torch.randn(40, 3, 28, 28, generator=gen) * 0.2 + (y[:, None, None, None] * 2.0 - 1.0)
    out = linear_eval_backbone(model, (images[:30], y[:30]), (images[30:], y[30:]), learning_rates=(0.1,), epochs=20, probe_batch_size=8, batch_size=7)
    assert out["notes"] == ["n_last_blocks=4 skipped: the backbone has only 2 blocks"]
    assert set(out["configs"]) == {"blocks1_cls_lr0.1", "blocks1_avgpool_lr0.1"}
    assert out["best"]["top1"] == 100.0
    assert model.training  # mode restored


def test_input_validation():
    f = Features(torch.randn(4, 1, 3), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    empty = Features(torch.zeros(0, 1, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="need train and val"):
        train_linear_probes(empty, f)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probes(f, f, epochs=0)
    with pytest.raises(ValueError, match="num_classes=1"):
        train_linear_probes(f, f, probe_configs((1,), (False,), (0.1,)), num_classes=1)


def test_eval_linear_command(tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from dvtrain.data.shards import convert_to_mds
    from dvtrain.eval.commands import app

    vit = pytest.importorskip("dvtrain.models.vit")
    rng = np.random.default_rng(0)
    for name, n in (("train", 20), ("val", 10)):
        labels = np.arange(n) % 2
        images = np.where(labels[:, None, None] == 1, 230, 20).astype(np.uint8) + (rng.random((n, 28, 28)) * 20).astype(np.uint8)
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels)
        convert_to_mds(tmp_path / f"{name}.npz", tmp_path / name, progress=False)
    torch.manual_seed(0)
    torch.save(vit.build_backbone("vit_tiny", img_size=28, patch_size=14, depth=4).state_dict(), tmp_path / "b.pth")
    out = tmp_path / "lin.json"
    res = CliRunner().invoke(app, [
        "linear", "-c", str(tmp_path / "b.pth"), "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
        "--json", str(out), "--lr", "0.01", "--lr", "1.0", "--epochs", "30", "--probe-batch-size", "8",
        "--image-size", "28", "--resize-size", "28", "--limit-train", "16", "--precision", "bf16",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert list(got["configs"]) == [c.name for c in probe_configs((1, 4), (False, True), (0.01, 1.0))]
    assert got["num_train"] == 16 and got["num_val"] == 10 and got["top5_n"] == 2
    assert got["best"]["top1"] == 100.0  # bright vs dark images
    assert got["best"]["name"] in got["configs"] and "best on val" in res.output
