"""fp16 loss scaling and skip accounting, non-finite steps in bf16/fp32, collapse monitor.

DeepSpeed's dynamic scaler (init 2^16, hysteresis 2, min 1): an overflow on every step keeps the
scale for one step (hysteresis), then halves it 16 times, reaching 1 after 17 calls; the 18th
overflows at the minimum and must raise. ``dinov2/train/train.py`` uses torch's GradScaler with the
same skip semantics.
"""

import math

import pytest
import torch

from _dist_utils import Box, allow_cpu_fp16, tiny_recipe, twin_linear
from dvtrain.checkpoint.atomic import find_latest_checkpoint
from dvtrain.train.trainer import CollapseMonitor, Trainer, TrainingDivergedError


def _trainer(precision, **optim):
    if precision == "fp16":
        allow_cpu_fp16()
    recipe = tiny_recipe(precision=precision, micro_batch=1, optim=optim, loss={"koleo_weight": 0.0})
    return Trainer(recipe, model=twin_linear(student_value=0.5, teacher_value=0.25))


def _batch(scale):
    return {"x": torch.ones(1, 8), "scale": torch.tensor(scale)}


OVERFLOW = 1e6  # x 2^16 and even unscaled: gradients beyond fp16's 65504
NORMAL = 1e-3  # gradients 1e-3 x 2^16 = 65.5: representable in fp16


def test_fp16_overflow_every_step_hits_min_scale_after_17_and_raises_on_18():
    tr = _trainer("fp16")
    teacher0 = tr.export_teacher_backbone()
    scales = []
    for _ in range(17):
        m = tr.train_step(_batch(OVERFLOW))
        assert m["step_applied"] == 0.0
        scales.append(m["loss_scale"])
    assert scales[0] == 2.0**16 and scales[1] == 2.0**15 and scales[-1] == 1.0
    assert scales == [2.0**16] + [2.0 ** (15 - i) for i in range(16)]
    assert tr.iteration == 0 and tr.engine.skipped_steps == 17 and tr.consecutive_skips == 17
    for k, v in tr.export_teacher_backbone().items():
        assert torch.equal(v, teacher0[k]), "a skipped step must not move the teacher"
    with pytest.raises(TrainingDivergedError, match="minimum loss scale 1"):
        tr.train_step(_batch(OVERFLOW))


def test_fp16_consecutive_skip_limit():
    tr = _trainer("fp16", max_consecutive_skipped_steps=5)
    for _ in range(4):
        tr.train_step(_batch(OVERFLOW))
    with pytest.raises(TrainingDivergedError, match="5 consecutive fp16 steps overflowed"):
        tr.train_step(_batch(OVERFLOW))


def test_fp16_skipped_step_repeats_schedule_and_recovers():
    tr = _trainer("fp16")
    sched = tr.schedules
    teacher0 = tr.export_teacher_backbone()
    m1 = tr.train_step(_batch(OVERFLOW))  # skipped
    assert m1["step_applied"] == 0.0 and m1["iteration"] == 0.0 and m1["momentum"] == sched.momentum[0]
    m2 = tr.train_step(_batch(NORMAL))  # applied with iteration-0 values again
    assert m2["step_applied"] == 1.0 and m2["iteration"] == 1.0
    assert m2["lr"] == sched.lr[0] and m2["momentum"] == sched.momentum[0] and m2["wd"] == sched.wd[0]
    assert tr.consecutive_skips == 0 and tr.engine.skipped_steps == 1
    m3 = tr.train_step(_batch(NORMAL))
    assert m3["lr"] == sched.lr[1] and m3["momentum"] == sched.momentum[1]
    # the teacher moved once per applied step: t = m0 t + (1 - m0) s with s updated by AdamW
    moved = tr.export_teacher_backbone()
    assert not torch.equal(moved["weight"], teacher0["weight"])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_nonfinite_steps_raise_after_limit_and_keep_last_checkpoint(tmp_path, precision):
    tr = _trainer(precision, max_nonfinite_losses=2)
    tr.train_step(_batch(1.0))
    good = tr.save_checkpoint(tmp_path, {"data": Box(pos=1)})
    student = tr.export_student_backbone()
    teacher = tr.export_teacher_backbone()
    m = tr.train_step(_batch(math.nan))
    assert m["step_applied"] == 0.0 and math.isnan(m["total"]) and tr.iteration == 1
    for k, v in tr.export_student_backbone().items():
        assert torch.equal(v, student[k]), "a NaN step must not reach the weights"
    with pytest.raises(TrainingDivergedError, match="2 steps had a non-finite loss"):
        tr.train_step(_batch(math.inf))
    for k, v in tr.export_teacher_backbone().items():
        assert torch.equal(v, teacher[k])
    assert find_latest_checkpoint(tmp_path) == good
    box = Box()
    assert tr.load_checkpoint(tmp_path, parts={"data": box}) == good and box.state == {"pos": 1}


def test_collapse_monitor_warns_once_per_episode():
    mon = CollapseMonitor(num_prototypes=64, tolerance=1e-3, patience=3)
    ln_k = math.log(64)
    assert not mon.update(ln_k + 5e-4) and not mon.update(ln_k - 5e-4)
    with pytest.warns(RuntimeWarning, match="collapse"):
        assert mon.update(ln_k)
    assert not mon.update(ln_k)  # once per episode
    assert not mon.update(ln_k - 0.5)  # reset
    assert mon.count == 0
    for _ in range(2):
        assert not mon.update(ln_k)
    with pytest.warns(RuntimeWarning):
        assert mon.update(ln_k + 2e-3 - 1.5e-3)
    assert not CollapseMonitor(64, patience=1).update(ln_k + 2e-3)  # outside the tolerance
