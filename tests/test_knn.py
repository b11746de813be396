"""k-NN evaluation: hand-computed votes, edge cases, chunking, a brute-force reference, 2 ranks."""

import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from dvtrain.eval.features import all_gather_uneven, extract_features, iter_batches
from dvtrain.eval.knn import (
    knn_eval_backbone,
    knn_eval_features,
    knn_votes,
    rank_classes,
    topk_neighbors,
)
from dvtrain.dist import find_free_port


def _unit(*xy):
    v = torch.tensor(xy, dtype=torch.float32)
    return v / v.norm()


def test_votes_hand_computed():
    # neighbour sims 1.0 (class 0), 0.9, 0.9 (class 1); T = 0.07:
    # e = [1, exp(-0.1/0.07), exp(-0.1/0.07)] = [1, 0.23965, 0.23965] -> class 0: 1/1.47930
    sims = torch.tensor([[1.0, 0.9, 0.9]])
    labels = torch.tensor([[0, 1, 1]])
    votes = knn_votes(sims, labels, num_classes=3, temperature=0.07)
    e = math.exp(-0.1 / 0.07)
    assert votes[0, 0].item() == pytest.approx(1 / (1 + 2 * e), rel=1e-6)
    assert votes[0, 1].item() == pytest.approx(2 * e / (1 + 2 * e), rel=1e-6)
    assert votes[0, 2].item() == 0.0
    assert votes.sum().item() == pytest.approx(1.0, rel=1e-6)
    # T = 1: the two class-1 neighbours outvote the single closer one (2 e^-0.1 > 1)
    votes_t1 = knn_votes(sims, labels, num_classes=3, temperature=1.0)
    assert votes_t1[0, 1] > votes_t1[0, 0]


def test_temperature_changes_the_decision():
    # train: A at angle 0 (class 0), two B points at cos = 0.9 (class 1); query at angle 0
    a = _unit(1.0, 0.0)
    b1 = torch.tensor([0.9, math.sqrt(1 - 0.81)])
    b2 = torch.tensor([0.9, -math.sqrt(1 - 0.81)])
    train = torch.stack([a, b1, b2])
    labels = torch.tensor([0, 1, 1])
    q = a[None]
    r = knn_eval_features(train, labels, q, torch.tensor([0]), ks=(3,), temperature=0.07)
    assert r["per_k"]["3"]["top1"] == 100.0
    r = knn_eval_features(train, labels, q, torch.tensor([0]), ks=(3,), temperature=1.0)
    assert r["per_k"]["3"]["top1"] == 0.0
    assert r["per_k"]["3"]["top5"] == 100.0  # class 0 is second of the 2 voted classes


def test_k_clamped_to_train_size_and_top5_with_few_classes():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    val = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    r = knn_eval_features(train, labels, val, torch.tensor([0, 1]), ks=(1, 10, 200))
    assert r["num_classes"] == 3 and r["top5_n"] == 3
    assert r["per_k"]["10"]["k_effective"] == 3 and r["per_k"]["200"]["k_effective"] == 3
    assert r["per_k"]["1"]["k_effective"] == 1
    assert any("k=200" in n and "k=3" in n for n in r["notes"])
    assert any("top-3" in n for n in r["notes"])
    for k in ("1", "10", "200"):
        assert r["per_k"][k]["top1"] == 100.0
    # k=1: one voted class per query; top-"5" (= top-3) contains only voted classes -> same as top-1
    assert r["per_k"]["1"]["top5"] == 100.0
    # query of class 2 whose nearest neighbour is class 0: unvoted classes never count as hits
    r = knn_eval_features(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([2]), ks=(1, 3))
    assert r["per_k"]["1"]["top1"] == 0.0 and r["per_k"]["1"]["top5"] == 0.0
    assert r["per_k"]["3"]["top5"] == 100.0  # k=3 votes for all 3 classes


def test_neighbour_ties_prefer_lower_train_index():
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0]])
    for labels, expected in (([1, 0, 2], 1), ([0, 1, 2], 0), ([2, 1, 0], 2)):
        sims, idx = topk_neighbors(q @ same.T, 1)
        assert idx.tolist() == [[0]]
        r = knn_eval_features(same, torch.tensor(labels), q, torch.tensor([expected]), ks=(1,))
        assert r["per_k"]["1"]["top1"] == 100.0
    # ties inside the selection are ordered by index too; a strictly better sample comes first
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.9, 0.1]])
    vals, idx = topk_neighbors(sim, 4)
    assert idx.tolist() == [[1, 4, 0, 2]]
    assert vals[0].tolist() == pytest.approx([0.9, 0.9, 0.5, 0.5])


def test_class_vote_ties_prefer_lower_class_id():
    votes = torch.tensor([[0.25, 0.25, 0.0, 0.5], [0.0, 0.5, 0.5, 0.0]])
    pred = rank_classes(votes, 4)
    assert pred.tolist() == [[3, 0, 1, -1], [1, 2, -1, -1]]
    # equal votes from two equally similar neighbours: class 0 wins although its sample is second
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    r = knn_eval_features(train, torch.tensor([1, 0]), train[:1], torch.tensor([0]), ks=(2,))
    assert r["per_k"]["2"]["top1"] == 100.0


def test_empty_class_and_unknown_val_label():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 2])  # class 1 has no train sample
    val = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.0, 1.0]])
    val_labels = torch.tensor([0, 2, 1, 3])  # class 1: empty in train; class 3: only in val
    r = knn_eval_features(train, labels, val, val_labels, ks=(1, 2))
    assert r["num_classes"] == 4 and r["classes_without_train"] == [1, 3]
    assert r["per_k"]["1"]["top1"] == 50.0 and r["per_k"]["2"]["top5"] == 50.0


def test_input_validation():
    t = torch.randn(4, 3)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="train bank is empty"):
        knn_eval_features(t[:0], y[:0], t, y)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        knn_eval_features(t, torch.tensor([0, -1, 0, 1]), t, y)
    with pytest.raises(ValueError, match="integer class ids"):
        knn_eval_features(t, y.float(), t, y)
    with pytest.raises(ValueError, match="differ in width"):
        knn_eval_features(t, y, torch.randn(4, 5), y)
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_eval_features(t, torch.tensor([0, 1, 2, 1]), t, y, num_classes=2)
    with pytest.raises(ValueError, match="temperature"):
        knn_eval_features(t, y, t, y, temperature=0.0)


def _reference_hits(train, train_y, val, val_y, k, T, C):
    """Independent per-query implementation of the documented rules (python sorting)."""
    train = torch.nn.functional.normalize(train.double(), dim=1)
    val = torch.nn.functional.normalize(val.double(), dim=1)
    top1 = top5 = 0
    for q, y in zip(val, val_y.tolist()):
        sims = (train @ q).tolist()
        order = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]
        w = [math.exp(sims[i] / T) for i in order]
        votes = [0.0] * C
        for i, wi in zip(order, w):
            votes[int(train_y[i])] += wi / sum(w)
        ranked = [c for c in sorted(range(C), key=lambda c: (-votes[c], c)) if votes[c] > 0][: min(5, C)]
        top1 += ranked[0] == y
        top5 += y in ranked
    return top1, top5


def test_matches_reference_and_dinov2_formula_on_random_data():
    g = torch.Generator().manual_seed(1)
    C, D = 7, 16
    centers = torch.randn(C, D, generator=g)
    train_y = torch.randint(0, C, (300,), generator=g)
    val_y = torch.randint(0, C, (97,), generator=g)
    train = centers[train_y] + 1.5 * torch.randn(300, D, generator=g)
    val = centers[val_y] + 1.5 * torch.randn(97, D, generator=g)
    ks = (1, 10, 20, 100)
    r = knn_eval_features(train, train_y, val, val_y, ks=ks, chunk_size=13)
    r_full = knn_eval_features(train, train_y, val, val_y, ks=ks)
    assert r == r_full  # chunking does not change anything
    for k in ks:
        t1, t5 = _reference_hits(train, train_y, val, val_y, k, 0.07, C)
        assert r["per_k"][str(k)]["top1"] == pytest.approx(100.0 * t1 / 97)
        assert r["per_k"][str(k)]["top5"] == pytest.approx(100.0 * t5 / 97)
    # the dinov2 formula (softmax over max_k, partial sums, one_hot) gives the same top-1
    tn = torch.nn.functional.normalize(train, dim=1)
    vn = torch.nn.functional.normalize(val, dim=1)
    sims, idx = (vn @ tn.T).topk(max(ks), dim=1)
    w = torch.softmax(sims / 0.07, 1)
    probas = torch.nn.functional.one_hot(train_y[idx], C) * w[..., None]
    for k in ks:
        acc = (probas[:, :k].sum(1).argmax(1) == val_y).float().mean().item() * 100
        assert r["per_k"][str(k)]["top1"] == pytest.approx(acc)
    assert r["per_k"]["20"]["top1"] > 60.0  # the clusters are separable enough to matter


def test_ten_thousand_queries_against_ten_thousand_bank_is_fast():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    g = torch.Generator().manual_seed(0)
    train = torch.randn(10_000, 384, generator=g)
    val = torch.randn(10_000, 384, generator=g)
    y_train = torch.randint(0, 10, (10_000,), generator=g)
    y_val = torch.randint(0, 10, (10_000,), generator=g)
    t0 = time.perf_counter()
    r = knn_eval_features(train, y_train, val, y_val, ks=(10, 20, 100, 200))
    elapsed = time.perf_counter() - t0
    assert elapsed < 20.0, f"10k x 10k k-NN took {elapsed:.1f} s"
    for k in ("10", "20", "100", "200"):  # random labels: chance level
        assert 5.0 < r["per_k"][k]["top1"] < 15.0


def test_backbone_wrapper_uses_cls_token():
    vit = pytest.importorskip("dvtrain.models.vit")
    model = vit.build_backbone("vit_tiny", img_size=28, patch_size=14, depth=2).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 28, 28, generator=g)
    labels = torch.arange(12) % 3
    r = knn_eval_backbone(model, (images[:8], labels[:8]), (images[8:], labels[8:]), ks=(1, 3), batch_size=5)
    with torch.no_grad():
        f = model.forward_features(images)["x_norm_clstoken"]
    expected = knn_eval_features(f[:8], labels[:8], f[8:], labels[8:], ks=(1, 3))
    assert r == expected
    feats = extract_features(model, iter_batches(images, labels, 5), n_last_blocks=2)
    torch.testing.assert_close(feats.cls_ND, f, rtol=1e-5, atol=1e-5)
    assert feats.cls_NLD.shape == (12, 2, model.embed_dim)
    with torch.no_grad():
        patches = model.forward_features(images)["x_norm_patchtokens"].mean(1)
    torch.testing.assert_close(feats.patch_mean_ND, patches, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# two ranks (gloo)


def _worker(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train, train_y, val, val_y = data
        # uneven strided shares: rank 0 gets one more train sample (odd count)
        gathered = all_gather_uneven(torch.arange(rank, 5, world))
        r = knn_eval_features(
            train[rank::world], train_y[rank::world], val[rank::world], val_y[rank::world],
            ks=(1, 5, 50, 500), sharded=True,
        )
        out[rank] = (r, gathered.tolist())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_equal_one_process():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(101, 8, generator=g)
    val = torch.randn(33, 8, generator=g)
    train_y = torch.randint(0, 4, (101,), generator=g)
    val_y = torch.randint(0, 4, (33,), generator=g)
    # keep the bank's order equal to the gathered one (rank 0's samples first) so ties agree
    order = torch.cat([torch.arange(0, 101, 2), torch.arange(1, 101, 2)])
    single = knn_eval_features(train[order], train_y[order], val, val_y, ks=(1, 5, 50, 500))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, find_free_port(), (train, train_y, val, val_y), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0][1] == [0, 2, 4, 1, 3] == results[1][1]
    assert results[0][0] == single and results[1][0] == single
    assert single["per_k"]["500"]["k_effective"] == 101


# ------------------------------------------------------------------------------------------------
# the command on MDS shards, JSON and W&B (offline)


def _mds(tmp_path, name, n, seed):
    import numpy as np

    from dvtrain.data.shards import convert_to_mds

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    # class c: bright square in a class-specific corner on a dark background
    images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, c in enumerate(labels):
        r0, c0 = [(0, 0), (0, 14), (14, 0)][c]
        images[i, r0 : r0 + 14, c0 : c0 + 14] = 220
    np.savez(tmp_path / f"{name}.npz", images=images, labels=labels)
    convert_to_mds(tmp_path / f"{name}.npz", tmp_path / name, progress=False)
    return tmp_path / name, torch.from_numpy(images), torch.from_numpy(labels)


def test_eval_knn_command_json_and_wandb(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from dvtrain.eval.commands import app
    from dvtrain.eval.features import eval_transform
    from dvtrain.models.vit import build_backbone
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train_dir, train_imgs, train_y = _mds(tmp_path, "train", 24, 0)
    val_dir, val_imgs, val_y = _mds(tmp_path, "val", 9, 1)
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", img_size=28, patch_size=14, depth=2).eval()
    torch.save(model.state_dict(), tmp_path / "b.pth")
    out = tmp_path / "knn.json"
    res = CliRunner().invoke(app, [
        "knn", "-c", str(tmp_path / "b.pth"), "--train", str(train_dir), "--val", str(val_dir), "--json", str(out),
        "--k", "1", "--k", "5", "--k", "100", "--image-size", "28", "--resize-size", "28", "--batch-size", "7",
        "--wandb-project", "dvtrain-test", "--wandb-mode", "offline",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    # the same numbers from the Python API on the same decoded, transformed images
    def prep(imgs):
        return torch.stack([eval_transform(Image.fromarray(a.numpy()), 28, 28) for a in imgs])

    want = knn_eval_backbone(model, (prep(train_imgs), train_y), (prep(val_imgs), val_y), ks=(1, 5, 100))
    assert got["per_k"] == want["per_k"]
    assert got["per_k"]["100"]["k_effective"] == 24 and got["num_classes"] == 3 and got["top5_n"] == 3
    assert got["config"]["source_format"] == "dinov2-hub"
    assert "k=1: top-1" in res.output
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    res = CliRunner().invoke(app, ["knn", "-c", str(tmp_path / "b.pth"), "--train", str(tmp_path), "--val", str(val_dir)])
    assert res.exit_code == 1 and "not an MDS dataset directory" in res.output
