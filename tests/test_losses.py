"""DINO / iBOT / KoLeo losses and teacher targets: hand-computed values, reference formulas, all-reduce.

References: dinov2/loss/dino_clstoken_loss.py, dinov2/loss/ibot_patch_loss.py, dinov2/loss/koleo_loss.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dvtrain.losses.dino import DINOLoss, sinkhorn_knopp
from dvtrain.losses.ibot import iBOTPatchLoss
from dvtrain.dist import find_free_port

LN3 = math.log(3.0)
# student logits s = [0.1 ln 3, 0] at T_s = 0.1 -> softmax = [3/4, 1/4]
S_34 = [0.1 * LN3, 0.0]


def _reference_sinkhorn_f64(logits, temp, n_iter=3):
    """dinov2's sinkhorn_knopp_teacher, single process, in float64 (no overflow for these inputs)."""
    q = torch.exp(logits.double() / temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


# ---------------------------------------------------------------- DINO cross-entropy
def test_dino_cross_entropy_hand_computed():
    loss = DINOLoss(2)
    t = torch.tensor([[0.5, 0.5]])
    # -(0.5 ln 3/4 + 0.5 ln 1/4) = 0.5 ln(16/3) = 0.836988
    assert loss([torch.tensor([S_34])], [t]).item() == pytest.approx(0.5 * math.log(16 / 3), abs=1e-6)
    # second student [0, 0] -> [1/2, 1/2] -> ln 2; the pair losses add up
    two = loss([torch.tensor([S_34]), torch.tensor([[0.0, 0.0]])], [t])
    assert two.item() == pytest.approx(0.836988 + math.log(2), abs=1e-6)
    # rows are averaged: teacher [1, 0] on row 1 (-ln 3/4), [0, 1] on row 2 (-ln 1/4)
    rows = loss([torch.tensor([S_34, S_34])], [torch.tensor([[1.0, 0.0], [0.0, 1.0]])])
    assert rows.item() == pytest.approx(0.5 * (-math.log(0.75) - math.log(0.25)), abs=1e-6)


def test_dino_loss_gradient_matches_softmax_difference():
    # d/ds of -sum t log softmax(s / T) = (softmax(s / T) - t) / T
    s = torch.tensor([S_34], requires_grad=True)
    DINOLoss(2)([s], [torch.tensor([[0.5, 0.5]])]).backward()
    assert torch.allclose(s.grad, torch.tensor([[0.25, -0.25]]) / 0.1, atol=1e-5)


# ---------------------------------------------------------------- centering
def test_softmax_center_teacher_hand_computed():
    loss = DINOLoss(2)
    loss.center.fill_(0.01)
    # (t - c) / 0.04 = [ln 3, 0] -> [3/4, 1/4]
    out = loss.softmax_center_teacher(torch.tensor([[0.04 * LN3 + 0.01, 0.01]]), teacher_temp=0.04)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[0.75, 0.25]]), atol=1e-6)


def test_center_ema_skips_non_finite_batches():
    loss = DINOLoss(3, center_momentum=0.9)
    loss.update_center(torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 0.0, 1.0]]))
    loss.apply_center_update()
    assert loss.center.tolist() == [[0.0, 0.0, 0.0]]
    loss.update_center(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    loss.apply_center_update()
    # 0.9 * 0 + 0.1 * mean([[1, 0, 0], [0, 0, 1]]) = [0.05, 0, 0.05]
    assert torch.allclose(loss.center, torch.tensor([[0.05, 0.0, 0.05]]))
    # inf is skipped as well; nothing pending -> no change
    loss.update_center(torch.tensor([[float("inf"), 0.0, 0.0]]))
    loss.apply_center_update()
    loss.apply_center_update()
    assert torch.allclose(loss.center, torch.tensor([[0.05, 0.0, 0.05]]))


def test_center_pools_micro_batches_until_applied():
    loss = DINOLoss(2, center_momentum=0.5)
    loss.update_center(torch.tensor([[2.0, 0.0]]))
    loss.update_center(torch.tensor([[0.0, 4.0], [0.0, 2.0]]))
    assert loss.center.tolist() == [[0.0, 0.0]]  # nothing applied before the step boundary
    loss.apply_center_update()
    # mean of the 3 rows = [2/3, 2]; 0.5 * 0 + 0.5 * mean
    assert torch.allclose(loss.center, torch.tensor([[1 / 3, 1.0]]))


def test_center_is_a_checkpointed_fp32_buffer():
    loss = DINOLoss(4)
    assert "center" in loss.state_dict() and "pending_sum" not in loss.state_dict()
    loss.half()
    assert loss.center.dtype == torch.float32 and loss.pending_sum.dtype == torch.float32
    loss.center.fill_(0.25)
    other = DINOLoss(4)
    other.load_state_dict(loss.state_dict())
    assert other.center.tolist() == [[0.25] * 4]


# ---------------------------------------------------------------- Sinkhorn-Knopp
def test_sinkhorn_issue_example_is_finite_and_exact():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    q = DINOLoss(3).sinkhorn_knopp_teacher(logits, teacher_temp=0.04)
    # by hand (3 iterations): column 0 -> [1, 2/7, 2/7] / (11/7); column 1 -> [~0, 1/2, 1/2]
    expected = torch.tensor([[7 / 11, 2 / 11, 2 / 11], [0.0, 0.5, 0.5]])
    assert q.dtype == torch.float32
    assert torch.allclose(q, expected, atol=1e-6)
    assert torch.allclose(q, _reference_sinkhorn_f64(logits, 0.04).float(), atol=1e-6)
    # the reference's fp32 form overflows (exp(100) = inf -> NaN) ...
    naive = torch.exp(logits / 0.04)
    assert torch.isinf(naive).any()
    # ... and a per-row max changes the answer after 3 iterations
    per_row = _reference_sinkhorn_f64(logits - logits.max(dim=1, keepdim=True).values, 0.04).float()
    assert not torch.allclose(per_row, expected, atol=1e-3)


def test_sinkhorn_matches_reference_formula_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    for temp in (0.04, 0.07, 1.0):
        q = sinkhorn_knopp(logits, temp)
        assert torch.allclose(q, _reference_sinkhorn_f64(logits, temp).float(), atol=1e-5, rtol=1e-4)
        assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-5)


def test_sinkhorn_underflowed_prototype_stays_zero_instead_of_nan():
    # prototype 2 is 10 below the max everywhere: exp(-250) == 0 in fp32 -> a zero row in Q
    logits = torch.tensor([[5.0, 0.0, -5.0], [4.0, 1.0, -5.0]])
    q = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(2), atol=1e-6) and (q[:, 2] == 0).all()


def test_sinkhorn_empty_batch_and_bad_arguments():
    assert sinkhorn_knopp(torch.zeros(0, 4), 0.04).shape == (0, 4)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 4), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 4), 0.1, n_iterations=0)


# ---------------------------------------------------------------- iBOT
def test_ibot_weighted_masked_loss_hand_computed():
    loss = iBOTPatchLoss(2)
    student = torch.tensor([S_34, S_34, S_34])  # every token predicts [3/4, 1/4]
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # token 0 alone in image 0 (weight 1), tokens 1, 2 in image 1 (weight 1/2); 4 global images
    weights = torch.tensor([1.0, 0.5, 0.5])
    got = loss.forward_masked(student, teacher, weights, num_images=4)
    ce = [-math.log(0.75), -math.log(0.25), 0.5 * math.log(16 / 3)]
    assert got.item() == pytest.approx((ce[0] + 0.5 * ce[1] + 0.5 * ce[2]) / 4, abs=1e-6)
    assert got.item() == pytest.approx(0.349831, abs=1e-6)
    # same as the reference's dense form: mean over each image's masked tokens, averaged over images
    s_dense = torch.tensor(S_34).expand(4, 2, 2)
    t_dense = torch.zeros(4, 2, 2)
    t_dense[0, 0], t_dense[1, 0], t_dense[1, 1] = teacher[0], teacher[1], teacher[2]
    masks = torch.tensor([[True, False], [True, True], [False, False], [False, False]])
    dense = torch.sum(t_dense * torch.log_softmax(s_dense / 0.1, dim=-1), dim=-1)
    dense = -(torch.sum(dense * masks, dim=-1) / masks.sum(-1).clamp(min=1)).mean()
    assert got.item() == pytest.approx(dense.item(), abs=1e-6)


def test_ibot_targets_and_errors():
    loss = iBOTPatchLoss(3)
    assert loss.center.shape == (1, 3)
    t = loss.sinkhorn_knopp_teacher(torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 0.04)
    assert torch.allclose(t[0], torch.tensor([7 / 11, 2 / 11, 2 / 11]), atol=1e-6)
    assert loss.forward_masked(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0), num_images=4).item() == 0.0
    with pytest.raises(ValueError, match="masked token counts"):
        loss.forward_masked(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(2), num_images=4)
    with pytest.raises(ValueError, match="num_images"):
        loss.forward_masked(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1), num_images=0)


# ---------------------------------------------------------------- KoLeo
def test_koleo_module_sums_crops_hand_computed():
    koleo = pytest.importorskip("dvtrain.losses.koleo", reason="dvtrain.kernels.koleo not written yet")
    module = koleo.KoLeoLoss(num_crops=2)
    # crop 1: directions 0, 90, 180 deg (unnormalised) -> every nearest neighbour at distance sqrt 2
    crop1 = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0]])
    # crop 2: directions 0, 60, 120 deg -> nearest neighbour at chord 2 sin 30 deg = 1 -> log 1 = 0
    ang = torch.tensor([0.0, math.pi / 3, 2 * math.pi / 3])
    crop2 = torch.stack([ang.cos(), ang.sin()], dim=1) * 4.0
    got = module(torch.cat([crop1, crop2]))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(-math.log(math.sqrt(2.0)) + 0.0, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        module(torch.randn(2, 4))
    with pytest.raises(ValueError, match="cannot be split"):
        module(torch.randn(5, 4))


# ---------------------------------------------------------------- two processes (gloo)
def _dist_worker(rank, world, port, logits, rows_per_rank, centers, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        start = sum(rows_per_rank[:rank])
        local = logits[start : start + rows_per_rank[rank]]
        q = sinkhorn_knopp(local, 0.04)
        loss = DINOLoss(3, center_momentum=0.9)
        loss.update_center(centers[rank])
        loss.apply_center_update()
        out[rank] = (q, loss.center.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_sinkhorn_and_center_are_global_over_ranks():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=g) * 3
    rows = [2, 3]  # unequal rows per rank (iBOT masked-token counts differ)
    centers = [torch.tensor([[float("nan"), 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_dist_worker, args=(2, find_free_port(), logits, rows, centers, out), nprocs=2, join=True)
        results = dict(out)
    full = sinkhorn_knopp(logits, 0.04)
    assert torch.allclose(torch.cat([results[0][0], results[1][0]]), full, atol=1e-6)
    # rank 0's batch is non-finite and left out; rank 1's mean is [0.5, 0, 0.5] -> center [0.05, 0, 0.05]
    for rank in (0, 1):
        assert torch.allclose(results[rank][1], torch.tensor([[0.05, 0.0, 0.05]]))


@pytest.mark.gpu
def test_sinkhorn_and_centering_on_cuda_match_cpu():
    # the issue example relies on exp(-100) ~ 3.7e-44 (an fp32 subnormal) surviving on the device
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    q = sinkhorn_knopp(logits.cuda(), 0.04)
    assert torch.allclose(q.cpu(), torch.tensor([[7 / 11, 2 / 11, 2 / 11], [0.0, 0.5, 0.5]]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    assert torch.allclose(sinkhorn_knopp(x.cuda().bfloat16(), 0.04).cpu(), sinkhorn_knopp(x.bfloat16(), 0.04),
                          atol=1e-5)
    loss = DINOLoss(128).cuda().half()
    assert loss.center.dtype == torch.float32 and loss.center.is_cuda
    loss.update_center(x.cuda().half())
    loss.apply_center_update()
    assert torch.allclose(loss.center.cpu(), 0.1 * x.half().float().mean(0, keepdim=True), atol=1e-5)
