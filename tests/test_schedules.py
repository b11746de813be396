"""Schedules with the reference settings (dinov2/train/train.py build_schedulers, utils CosineScheduler)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dvtrain.train.schedules import Schedule, build_schedules, cosine_schedule, scale_lr

EPOCH = 1250


@pytest.fixture(scope="module")
def ref():
    # vitl16_short-like reference values: 100 epochs, lr warmup 10, temp 0.04 -> 0.07 over 30, freeze 1
    return build_schedules(
        lr=0.004, min_lr=1e-6, epochs=100, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.992, final_momentum_teacher=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=30, freeze_last_layer_epochs=1, epoch_length=EPOCH,
    )


def test_teacher_temperature(ref):
    t = ref.teacher_temp
    assert len(t) == 30 * EPOCH
    assert t[0] == pytest.approx(0.04, abs=1e-12)
    # linspace(0.04, 0.07, 37500)[18750] = 0.04 + 0.03 * 18750 / 37499
    assert t[18750] == pytest.approx(0.0550004, abs=5e-8)
    assert t[37499] == pytest.approx(0.07, abs=1e-12)
    assert t[37500] == t[100_000] == 0.07


def test_teacher_momentum(ref):
    m = ref.momentum
    assert m[0] == pytest.approx(0.992)
    assert m[62500] == pytest.approx(0.996, abs=1e-12)  # half-way on the cosine
    assert m[124_999] == pytest.approx(1.0, abs=1e-8)
    assert m[125_000] == m[10**7] == 1.0
    assert np.all(np.diff(m.values) >= 0)


def test_learning_rate_and_last_layer(ref):
    lr, last = ref.lr, ref.last_layer_lr
    assert lr[0] == 0.0
    assert lr[12_499] == pytest.approx(0.004)  # end of the 10-epoch warmup
    assert lr[6249] == pytest.approx(0.004 * 6249 / 12_499)
    # cosine: at the middle of the 112500 cosine iterations the lr is the mean of peak and min
    assert lr[12_500 + 56_250] == pytest.approx((0.004 + 1e-6) / 2)
    assert lr[125_000] == 1e-6
    # last layer frozen for exactly iterations < 1250, then equal to the lr schedule
    assert all(last[i] == 0.0 for i in (0, 1, 1249)) and np.all(last.values[:1250] == 0)
    assert last[1250] == lr[1250] > 0 and np.array_equal(last.values[1250:], lr.values[1250:])


def test_weight_decay(ref):
    wd = ref.wd
    assert wd[0] == pytest.approx(0.04)
    assert wd[62_500] == pytest.approx(0.22)
    assert wd[125_000] == 0.4


def test_resume_reads_the_same_values(ref):
    k = 40_321
    assert ref.at(k) == {
        "lr": ref.lr.values[k], "wd": ref.wd.values[k], "momentum": ref.momentum.values[k],
        "teacher_temp": ref.teacher_temp[k], "last_layer_lr": ref.last_layer_lr.values[k],
    }
    again = build_schedules(
        lr=0.004, min_lr=1e-6, epochs=100, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.992, final_momentum_teacher=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=30, freeze_last_layer_epochs=1, epoch_length=EPOCH,
    )
    assert again.at(k) == ref.at(k)


def test_cosine_schedule_matches_reference_formula():
    s = cosine_schedule(1.0, 0.1, total_iters=10, warmup_iters=3, start_warmup_value=0.2, freeze_iters=2)
    expected = np.concatenate([
        np.zeros(2), np.linspace(0.2, 1.0, 3),
        0.1 + 0.5 * 0.9 * (1 + np.cos(np.pi * np.arange(5) / 5)),
    ])
    assert np.allclose(s.values, expected) and s[10] == 0.1
    assert isinstance(s[3], float)
    with pytest.raises(ValueError, match="exceed"):
        cosine_schedule(1.0, 0.0, total_iters=5, warmup_iters=6)
    with pytest.raises(ValueError, match=">= 0"):
        Schedule(np.ones(3), 1.0)[-1]


def test_lr_scaling_rules():
    assert scale_lr(0.004, 1024) == pytest.approx(0.004)
    assert scale_lr(0.004, 256) == pytest.approx(0.002)  # sqrt(1/4)
    assert scale_lr(0.004, 2048, "sqrt") == pytest.approx(0.004 * math.sqrt(2))
    assert scale_lr(0.004, 256, "linear") == pytest.approx(0.001)
    assert scale_lr(0.004, 256, "none") == 0.004
    with pytest.raises(ValueError, match="rule"):
        scale_lr(0.004, 256, "cubic")
    with pytest.raises(ValueError, match="batch"):
        scale_lr(0.004, 0)
