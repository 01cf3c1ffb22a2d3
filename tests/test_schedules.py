"""Weight schedules: endpoints, monotonicity, warmup, config building and validation."""
from __future__ import annotations

import pytest

from losses import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    StepSchedule,
    WeightSchedule,
    build_schedule,
)

TOTAL = 101
TRANSITIONS = [LinearSchedule, CosineSchedule, StepSchedule]


def _values(sched, total=TOTAL):
    return [sched(step, total) for step in range(total)]


@pytest.mark.parametrize("start,end", [(0.9, 0.1), (0.1, 0.9), (0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("cls", TRANSITIONS)
def test_transitions_hit_endpoints_and_are_monotone(cls, start, end):
    vals = _values(cls(start, end))
    assert vals[0] == pytest.approx(start) and vals[-1] == pytest.approx(end)
    steps = list(zip(vals, vals[1:]))
    if end < start:
        assert all(b <= a + 1e-12 for a, b in steps)
    else:
        assert all(b >= a - 1e-12 for a, b in steps)


def test_shapes_differ_in_the_middle():
    mid = TOTAL // 4
    lin, cos = LinearSchedule(1.0, 0.0), CosineSchedule(1.0, 0.0)
    assert lin(mid, TOTAL) == pytest.approx(0.75)
    assert cos(mid, TOTAL) > lin(mid, TOTAL)  # cosine is flat at the start
    assert cos(TOTAL // 2, TOTAL) == pytest.approx(0.5)


def test_step_schedule_levels():
    sched = StepSchedule(1.0, 0.0, boundaries=(0.25, 0.5, 0.75))
    assert sorted(set(_values(sched, 9)), reverse=True) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert _values(sched, 9) == pytest.approx([1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0, 0, 0])


def test_constant_and_past_the_end():
    assert set(_values(ConstantSchedule(0.3))) == {0.3}
    assert LinearSchedule(0.9, 0.1)(10 * TOTAL, TOTAL) == pytest.approx(0.1)
    assert LinearSchedule(0.9, 0.1)(0, 1) == pytest.approx(0.1)  # a one-step run ends at once


@pytest.mark.parametrize("cls", TRANSITIONS)
def test_warmup_hold_and_ramp(cls):
    hold = cls(0.8, 0.2, warmup_steps=10)
    assert _values(hold)[:11] == pytest.approx([0.8] * 11)
    assert hold(TOTAL - 1, TOTAL) == pytest.approx(0.2)
    ramp = cls(0.8, 0.2, warmup_steps=10, warmup="ramp")
    assert _values(ramp)[:11] == pytest.approx([0.08 * i for i in range(11)])
    assert ramp(TOTAL - 1, TOTAL) == pytest.approx(0.2)
    const = ConstantSchedule(0.5, warmup_steps=4, warmup="ramp")
    assert _values(const, 8) == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5])


def test_end_step_reaches_end_early_then_holds():
    sched = CosineSchedule(1.0, 0.0, warmup_steps=5, end_step=25)
    vals = _values(sched)
    assert vals[5] == pytest.approx(1.0) and vals[25] == pytest.approx(0.0)
    assert vals[25:] == pytest.approx([0.0] * (TOTAL - 25))


def test_weight_schedule_soft_fraction_and_independent():
    ws = WeightSchedule(CosineSchedule(0.9, 0.1))
    for step in range(TOTAL):
        w_hard, w_soft = ws(step, TOTAL)
        assert w_hard + w_soft == pytest.approx(1.0)
    assert ws(0, TOTAL) == pytest.approx((0.1, 0.9))
    assert ws(TOTAL - 1, TOTAL) == pytest.approx((0.9, 0.1))
    both = WeightSchedule(soft=ConstantSchedule(2.0), hard=LinearSchedule(0.0, 1.0))
    assert both(0, TOTAL) == pytest.approx((0.0, 2.0))
    assert both(TOTAL - 1, TOTAL) == pytest.approx((1.0, 2.0))


def test_build_from_config():
    cfg = {"kind": "cosine", "start": 0.9, "end": 0.1, "warmup_steps": 0}
    assert build_schedule(cfg) == CosineSchedule(0.9, 0.1)
    assert build_schedule(0.25) == ConstantSchedule(0.25)
    step = build_schedule({"kind": "step", "start": 0, "end": 1, "boundaries": [0.3, 0.6]})
    assert step == StepSchedule(0.0, 1.0, boundaries=(0.3, 0.6))
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "step"}

    assert WeightSchedule.from_config(cfg) == WeightSchedule(CosineSchedule(0.9, 0.1))
    assert WeightSchedule.from_config({"soft": cfg}) == WeightSchedule(CosineSchedule(0.9, 0.1))
    ws = WeightSchedule.from_config({"soft": {"kind": "constant", "value": 1.0},
                                     "hard": {"kind": "linear", "start": 1.0, "end": 0.0}})
    assert ws(TOTAL - 1, TOTAL) == pytest.approx((0.0, 1.0))


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"kind": "cosine", "start": -0.1, "end": 0.5}, "start must be"),
        ({"kind": "linear", "start": 0.5, "end": float("nan")}, "end must be"),
        ({"kind": "constant", "value": -1}, "value must be"),
        ({"kind": "linear", "start": 1, "end": 0, "warmup_steps": 10, "end_step": 5}, "end_step"),
        ({"kind": "linear", "start": 1, "end": 0, "warmup_steps": -1}, "warmup_steps"),
        ({"kind": "linear", "start": 1, "end": 0, "warmup": "sideways"}, "warmup must be"),
        ({"kind": "exponential", "start": 1, "end": 0}, "unknown schedule kind"),
        ({"kind": "linear", "start": 1, "end": 0, "stop": 3}, "bad fields"),
        ({"kind": "step", "start": 1, "end": 0, "boundaries": [0.6, 0.3]}, "boundaries"),
        ({"kind": "step", "start": 1, "end": 0, "boundaries": [1.5]}, "boundaries"),
        ({"start": 1, "end": 0}, "kind"),
    ],
)
def test_bad_configs_raise_clear_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(cfg)


def test_bad_weight_schedules_and_calls_raise():
    with pytest.raises(ValueError, match="soft-fraction"):
        WeightSchedule.from_config({"kind": "linear", "start": 2.0, "end": 0.0})
    with pytest.raises(ValueError, match="needs 'soft'"):
        WeightSchedule.from_config({"hard": {"kind": "constant", "value": 1.0}})
    with pytest.raises(ValueError, match="step"):
        LinearSchedule(1.0, 0.0)(-1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        LinearSchedule(1.0, 0.0)(0, 0)


def test_a_schedule_that_training_ends_before_is_said():
    """end_step past the last step (the weight never reaches `end`) or a warmup at or past the
    steps (the curve or the LR never starts): one note naming each key; none when all fit."""
    from distill.config import parse_config
    from distill.stages import schedule_note

    def note(steps, **student):
        return schedule_note(parse_config({"data": {"stdlib": True}, "teacher": {"source": "cache"},
                                           "train": {"steps": steps},
                                           "students": [{"name": "a", "model": {"preset": "dense"},
                                                         "optim": {"warmup_steps": 2}, **student}]}))

    late = {"loss": {"soft_weight": {"kind": "linear", "start": 1.0, "end": 0.0, "end_step": 10,
                                     "warmup_steps": 3}}}
    assert note(11, **late) is None  # schedule steps 0-10: end_step 10 is the last
    assert note(10, **late) == ("[train] note: training ends after 10 steps (schedule steps 0-9), before "
                                "students.0.loss.soft_weight.end_step 10: those curves (or the LR) never reach their end")
    assert note(3, **late) == ("[train] note: training ends after 3 steps (schedule steps 0-2), before "
                               "students.0.loss.soft_weight.end_step 10; students.0.loss.soft_weight.warmup_steps 3: "
                               "those curves (or the LR) never reach their end")
    # the LR's warmup peaks at step warmup_steps - 1: 2 of 2 steps reach it, 3 of 2 do not
    assert note(2) is None and "students.0.optim.warmup_steps 2" in note(1)
    # a constant has no end; held through its warmup it is its value from the first step
    const = {"kind": "constant", "start": 0.5, "end_step": 50, "warmup_steps": 9}
    assert note(5, loss={"soft_weight": const}) is None
    assert "soft_weight.warmup_steps 9" in note(5, loss={"soft_weight": {**const, "warmup": "ramp"}})
