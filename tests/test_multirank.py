"""2 ranks with micro-batch B == 1 rank with micro-batch 2B (same images, same seed), ZeRO-3 fp32 and bf16.

KoLeo is off (its nearest neighbours are searched in the per-rank batch, as in the reference) and drop
path is 0 (its random draws are per rank). Everything else (DINO centering with all-reduced centers,
iBOT per-image weights, gradient averaging, AdamW, EMA) must agree: fp32 to float rounding; bf16
within bf16 rounding of activations and of the gradient reduction.
"""

import pytest
import torch

from _dist_utils import make_batch, merge_batches, run_ranks, tiny_recipe
from dvtrain.dist import init_distributed

STEPS = 4
B = 2


def _recipe(precision, micro_batch):
    return tiny_recipe(precision=precision, micro_batch=micro_batch, loss={"koleo_weight": 0.0},
                       model={"drop_path_rate": 0.0})


def _two_ranks(rank, world, args, out_dir):
    from dvtrain.train.trainer import Trainer

    tr = Trainer(_recipe(args["precision"], B))
    losses = [tr.train_step(make_batch(s, B, offset=rank * B))["total"] for s in range(STEPS)]
    # the global loss is the mean of the equal-sized rank losses
    t = torch.tensor(losses, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {"losses": (t / world).tolist(), "teacher": tr.export_teacher_backbone(),
            "student": tr.export_student_backbone(), "center": tr.model.dino_loss.center.clone()}


@pytest.mark.dist
# Measured (4 steps): fp32 loss rel 1.2e-7, teacher 4e-9, student 9e-8; bf16 loss rel 1.1e-3, teacher 4.6e-5,
# student 3.4e-3 (bf16 activations and a bf16 gradient reduce-scatter; AdamW turns a few-ulp gradient
# difference into up to one lr-sized step, lr = 3e-3 here). Tolerances ~3-10x the measurement.
@pytest.mark.parametrize("precision, loss_tol, tols", [
    ("fp32", 1e-6, {"teacher": 1e-7, "student": 1e-6, "center": 1e-6}),
    ("bf16", 5e-3, {"teacher": 2e-4, "student": 1e-2, "center": 1e-2}),
])
def test_two_ranks_match_one_rank_double_batch(tmp_path, precision, loss_tol, tols):
    res = run_ranks(__file__, "_two_ranks", 2, tmp_path, {"precision": precision})
    # both ranks end with identical consolidated weights
    for part in ("teacher", "student"):
        for k, v in res[0][part].items():
            assert torch.equal(v, res[1][part][k]), (part, k)
    assert res[0]["losses"] == res[1]["losses"]

    from dvtrain.train.trainer import Trainer

    init_distributed()
    one = Trainer(_recipe(precision, 2 * B))
    ref = [one.train_step(merge_batches([make_batch(s, B, offset=0), make_batch(s, B, offset=B)]))["total"]
           for s in range(STEPS)]
    assert res[0]["losses"] == pytest.approx(ref, rel=loss_tol)
    for part, got in (("teacher", one.export_teacher_backbone()), ("student", one.export_student_backbone())):
        for k, v in got.items():
            torch.testing.assert_close(res[0][part][k], v, rtol=0, atol=tols[part], msg=f"{part}.{k}")
    torch.testing.assert_close(res[0]["center"], one.model.dino_loss.center, rtol=0, atol=tols["center"])


def test_threads_per_rank_rule():
    from dvtrain.dist import threads_per_rank

    assert threads_per_rank(2, num_cores=2) == 1  # 2 ranks x 1 thread on 2 cores
    assert threads_per_rank(1, num_cores=2) == 2
    assert threads_per_rank(3, num_cores=16) == 5
    assert threads_per_rank(4, num_cores=2) == 1  # oversubscribed: still one thread each
    with pytest.raises(ValueError, match="local_world_size"):
        threads_per_rank(0)
