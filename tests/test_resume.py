"""Exact resume: 6 iterations straight == 3 + save + fresh Trainer + load + 3, bit for bit (fp32, CPU),
with 1 and 2 processes; world-size change fails before the first step; batch change warns about lr."""

from pathlib import Path

import pytest
import torch

from _dist_utils import Box, make_batch, run_ranks, tiny_recipe
from dvtrain.dist import init_distributed


def _state(tr):
    return {
        "teacher": tr.export_teacher_backbone(),
        "student": tr.engine.gather_fp32_state_dict("student", ""),
        "teacher_all": tr.engine.gather_fp32_state_dict("teacher", ""),
        "center": tr.model.dino_loss.center.clone(),
        "ibot_center": tr.model.ibot_patch_loss.center.clone(),
        "iteration": tr.iteration,
    }


def _straight_and_resumed(rank, world, args, out_dir):
    """Runs in every rank (and in-process for 1 rank): returns losses and final state of both runs."""
    from dvtrain.train.trainer import Trainer

    recipe = tiny_recipe(micro_batch=args["micro_batch"])
    off = rank * args["micro_batch"]

    def batch(step):
        return make_batch(step, args["micro_batch"], offset=off)

    straight = Trainer(recipe)
    losses_a = [straight.train_step(batch(s)) for s in range(6)]
    state_a = _state(straight)

    first = Trainer(recipe)
    losses_b = [first.train_step(batch(s)) for s in range(3)]
    path = first.save_checkpoint(Path(args["ckpt"]), {"data": Box(next_step=3)})
    torch.manual_seed(1234)  # disturb the RNGs: load must restore them
    resumed = Trainer(recipe)
    box = Box()
    resumed.load_checkpoint(Path(args["ckpt"]), parts={"data": box})
    losses_b += [resumed.train_step(batch(s)) for s in range(box.state["next_step"], 6)]
    return {"a": losses_a, "b": losses_b, "state_a": state_a, "state_b": _state(resumed), "path": str(path)}


def _assert_identical(res):
    for key in res["a"][0]:
        assert [m[key] for m in res["a"]] == [m[key] for m in res["b"]], key
    for part in ("teacher", "student", "teacher_all"):
        for k, v in res["state_a"][part].items():
            assert torch.equal(v, res["state_b"][part][k]), (part, k)
    assert torch.equal(res["state_a"]["center"], res["state_b"]["center"])
    assert torch.equal(res["state_a"]["ibot_center"], res["state_b"]["ibot_center"])
    assert res["state_a"]["iteration"] == res["state_b"]["iteration"] == 6


def test_resume_bit_identical_one_rank(tmp_path):
    init_distributed()
    res = _straight_and_resumed(0, 1, {"micro_batch": 4, "ckpt": str(tmp_path)}, tmp_path)
    _assert_identical(res)
    assert res["a"][0]["total"] != res["a"][5]["total"]  # the run did train


@pytest.mark.dist
@pytest.mark.slow
def test_resume_bit_identical_two_ranks_and_world_size_change_fails(tmp_path):
    ckpt_root = tmp_path / "ckpt"
    res = run_ranks(__file__, "_straight_and_resumed", 2, tmp_path, {"micro_batch": 2, "ckpt": str(ckpt_root)})
    for r in res:
        _assert_identical(r)
    for part in ("teacher", "student"):  # both ranks hold the same consolidated weights
        for k, v in res[0]["state_a"][part].items():
            assert torch.equal(v, res[1]["state_a"][part][k])
    # a 2-rank checkpoint cannot resume on 1 rank: clear error naming both counts, before any step
    from dvtrain.train.trainer import Trainer

    init_distributed()
    tr = Trainer(tiny_recipe(micro_batch=4))
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\) but this run has 1"):
        tr.load_checkpoint(ckpt_root)
    assert tr.iteration == 0


def test_changed_global_batch_warns_with_lr(tmp_path):
    from dvtrain.train.trainer import Trainer

    init_distributed()
    tr = Trainer(tiny_recipe(micro_batch=4))
    tr.train_step(make_batch(0))
    tr.save_checkpoint(tmp_path)
    smaller = Trainer(tiny_recipe(micro_batch=2))
    with pytest.warns(UserWarning, match=r"global batch changed on resume: 4 -> 2 images; peak lr \(sqrt scaling\) "
                                         r"changes 0.003125 -> 0.00220971"):
        smaller.load_checkpoint(tmp_path)
    assert smaller.iteration == 1
    m = smaller.train_step(make_batch(1, 2))
    assert m["lr"] == pytest.approx(smaller.schedules.lr[1]) and m["step_applied"] == 1.0
