"""Atomic checkpoint directories, pruning, latest lookup, RNG capture, and a crash during a Trainer save."""

import random

import numpy as np
import pytest
import torch

from _dist_utils import make_batch, tiny_recipe
from dvtrain.dist import init_distributed
from dvtrain.train import checkpoint as ckpt


def _save(root, iteration, payload="x", fail=False):
    with ckpt.atomic_checkpoint_dir(root, iteration) as tmp:
        (tmp / "data.txt").write_text(payload)
        if fail:
            raise OSError("disk full (simulated)")
    return root / ckpt.checkpoint_name(iteration)


def test_atomic_save_creates_complete_dir_and_no_tmp(tmp_path):
    final = _save(tmp_path, 7, "seven")
    assert final.name == "iter_00000007" and ckpt.checkpoint_iteration(final) == 7
    assert (final / ckpt.COMPLETE_MARKER).read_text() == "7\n"
    assert (final / "data.txt").read_text() == "seven"
    assert [p.name for p in tmp_path.iterdir()] == ["iter_00000007"]


def test_crash_mid_save_keeps_last_good_and_next_save_cleans_up(tmp_path):
    good = _save(tmp_path, 1, "good")
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2, "partial", fail=True)
    assert not (tmp_path / "iter_00000002").exists()
    assert (tmp_path / "iter_00000002.tmp-save").exists()  # debris, never read
    assert ckpt.find_latest_checkpoint(tmp_path) == good
    assert (good / "data.txt").read_text() == "good"
    _save(tmp_path, 2, "second")
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "iter_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_00000001", "iter_00000002"]


def test_resave_same_iteration_replaces_atomically(tmp_path):
    _save(tmp_path, 3, "old")
    final = _save(tmp_path, 3, "new")
    assert (final / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_00000003"]


def test_prune_keeps_last_k_and_ignores_incomplete(tmp_path):
    for it in (1, 2, 3, 4, 5):
        _save(tmp_path, it)
    (tmp_path / "iter_00000009").mkdir()  # no COMPLETE marker: ignored
    (tmp_path / "iter_00000001.tmp-save").mkdir()  # stale debris older than the newest: removed
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["iter_00000001", "iter_00000001.tmp-save", "iter_00000002",
                                                "iter_00000003"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_00000004", "iter_00000005"]
    assert ckpt.find_latest_checkpoint(tmp_path).name == "iter_00000005"
    assert ckpt.find_latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_rng_state_roundtrip():
    state = ckpt.capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="capture_rng_state"):
        ckpt.restore_rng_state({"python": state["python"]})


def test_trainer_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from dvtrain.train.trainer import Trainer

    init_distributed()
    tr = Trainer(tiny_recipe(checkpoint={"keep_last": 2}))
    tr.train_step(make_batch(0))
    first = tr.save_checkpoint(tmp_path, {"samples_seen": 4})
    teacher_at_1 = tr.export_teacher_backbone()
    tr.train_step(make_batch(1))

    def crash():  # after the DeepSpeed files and teacher shards were written
        raise OSError("killed while saving (simulated)")

    monkeypatch.setattr(ckpt, "capture_rng_state", crash)
    with pytest.raises(OSError, match="simulated"):
        tr.save_checkpoint(tmp_path, {"samples_seen": 8})
    monkeypatch.undo()
    assert ckpt.find_latest_checkpoint(tmp_path) == first
    assert (tmp_path / "iter_00000002.tmp-save" / "ds").is_dir()  # the partial save never became a checkpoint

    fresh = Trainer(tiny_recipe(checkpoint={"keep_last": 2}))
    assert fresh.load_checkpoint(tmp_path) == {"samples_seen": 4}
    assert fresh.iteration == 1
    for k, v in fresh.export_teacher_backbone().items():
        assert torch.equal(v, teacher_at_1[k])
    # saving again works, prunes to keep_last and clears the stale temporary directory
    fresh.train_step(make_batch(1))
    fresh.save_checkpoint(tmp_path)
    fresh.train_step(make_batch(2))
    fresh.save_checkpoint(tmp_path)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["iter_00000002", "iter_00000003"]


def test_fit_checkpoints_every_n_and_stops_on_request(tmp_path):
    from dvtrain.train.trainer import Trainer

    init_distributed()
    tr = Trainer(tiny_recipe(checkpoint={"every": 2, "keep_last": 5}))
    seen = []

    def on_step(metrics):
        seen.append(metrics["iteration"])
        if metrics["iteration"] == 3:
            tr.request_stop()

    data = (make_batch(s) for s in range(100))
    reason = tr.fit(data, on_step=on_step, checkpoint_dir=tmp_path, extra_state=lambda: {"seen": len(seen)})
    assert reason == "stopped" and seen == [1.0, 2.0, 3.0]
    # every 2 iterations, plus a final one at the stop
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_00000002", "iter_00000003"]
    assert Trainer(tiny_recipe()).load_checkpoint(tmp_path / "iter_00000002") == {"seen": 2}
    short = Trainer(tiny_recipe())
    assert short.fit([make_batch(0), make_batch(1)]) == "data_exhausted" and short.iteration == 2
