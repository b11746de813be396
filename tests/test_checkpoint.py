"""Atomic checkpoint directories, pruning, latest lookup, crash recovery, RNG capture (weights_only), the
checkpointer's parts, and a crash during a Trainer save."""

import random

import numpy as np
import pytest
import torch

from _dist_utils import Box, make_batch, tiny_recipe
from dvtrain.checkpoint import atomic as ckpt
from dvtrain.checkpoint import layout
from dvtrain.checkpoint.rng import RNGState
from dvtrain.dist import init_distributed


def _save(root, iteration, payload="x", fail=False):
    with ckpt.atomic_checkpoint_dir(root, iteration) as tmp:
        (tmp / "data.txt").write_text(payload)
        if fail:
            raise OSError("disk full (simulated)")
    return root / layout.checkpoint_name(iteration)


def test_atomic_save_creates_complete_dir_and_no_tmp(tmp_path):
    final = _save(tmp_path, 7, "seven")
    assert final.name == "iter_00000007" and layout.checkpoint_iteration(final) == 7
    assert (final / layout.COMPLETE_MARKER).read_text() == "7\n"
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


def test_recover_finishes_complete_temporaries_and_clears_the_rest(tmp_path):
    _save(tmp_path, 1, "one")
    # killed between COMPLETE and the rename: complete and fsynced, so it is moved into place
    done = tmp_path / "iter_00000003.tmp-save"
    done.mkdir()
    (done / layout.COMPLETE_MARKER).write_text("3\n")
    # killed while writing the first files: removed
    (tmp_path / "iter_00000004.tmp-save").mkdir()
    # killed while replacing iter_00000002: the old copy moves back
    old = tmp_path / "iter_00000002.tmp-old"
    old.mkdir()
    (old / layout.COMPLETE_MARKER).write_text("2\n")
    actions = ckpt.recover_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_00000001", "iter_00000002", "iter_00000003"]
    assert len(actions) == 3 and any("removed unfinished checkpoint iter_00000004.tmp-save" in a for a in actions)
    assert ckpt.find_latest_checkpoint(tmp_path).name == "iter_00000003"


def test_rng_state_roundtrip_loads_weights_only(tmp_path):
    torch.save(RNGState().state_dict(), tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    RNGState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])
    with pytest.raises(ValueError, match="RNGState"):
        RNGState().load_state_dict({"python": random.getstate()})


def test_trainer_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from dvtrain.train.trainer import Trainer

    init_distributed()
    tr = Trainer(tiny_recipe(checkpoint={"keep_last": 2}))
    tr.train_step(make_batch(0))
    first = tr.save_checkpoint(tmp_path, {"data": Box(samples_seen=4)})
    teacher_at_1 = tr.export_teacher_backbone()
    tr.train_step(make_batch(1))

    def crash(self):  # after the DeepSpeed files and teacher shards were written
        raise OSError("killed while saving (simulated)")

    monkeypatch.setattr(RNGState, "state_dict", crash)
    with pytest.raises(OSError, match="simulated"):
        tr.save_checkpoint(tmp_path, {"data": Box(samples_seen=8)})
    monkeypatch.undo()
    assert ckpt.find_latest_checkpoint(tmp_path) == first
    assert (tmp_path / "iter_00000002.tmp-save" / layout.DS_TAG).is_dir()  # the partial save never became one

    fresh = Trainer(tiny_recipe(checkpoint={"keep_last": 2}))
    box = Box()
    assert fresh.load_checkpoint(tmp_path, parts={"data": box}) == first and box.state == {"samples_seen": 4}
    assert fresh.iteration == 1
    for k, v in fresh.export_teacher_backbone().items():
        assert torch.equal(v, teacher_at_1[k])
    # the layout's files are all there, and every one but DeepSpeed's loads with weights_only=True
    names = {p.name for p in first.iterdir()}
    assert {layout.TRAIN_STATE_FILE, layout.DATA_FILE, layout.RECIPE_FILE, layout.COMPLETE_MARKER, layout.DS_TAG,
            layout.rank_file(layout.RNG_FILE, 0), layout.rank_file(layout.TEACHER_FILE, 0)} <= names
    state = torch.load(first / layout.TRAIN_STATE_FILE, weights_only=True)
    assert set(layout.TRAIN_STATE_KEYS) <= set(state) and state["iteration"] == 1
    assert set(torch.load(first / layout.rank_file(layout.TEACHER_FILE, 0), weights_only=True)) == set(layout.TEACHER_KEYS)
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
    box = Box(seen=0)
    signal_flag = {"set": False}

    def on_step(metrics):
        seen.append(metrics["iteration"])
        box.state["seen"] = len(seen)
        signal_flag["set"] = metrics["iteration"] == 2  # "a signal arrives during step 3"

    data = (make_batch(s) for s in range(100))
    reason = tr.fit(data, on_step=on_step, checkpointer=tr.checkpointer(tmp_path), parts={"data": box},
                    stop_requested=lambda: signal_flag["set"])
    assert reason == "stopped" and seen == [1.0, 2.0, 3.0]
    # every 2 iterations, plus a final one at the stop
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_00000002", "iter_00000003"]
    restored = Box()
    Trainer(tiny_recipe()).load_checkpoint(tmp_path / "iter_00000002", parts={"data": restored})
    assert restored.state == {"seen": 2}
    short = Trainer(tiny_recipe())
    assert short.fit([make_batch(0), make_batch(1)]) == "data_exhausted" and short.iteration == 2
