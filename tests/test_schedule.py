"""The learning-rate schedule (`bertode/training/schedule.py`) against its closed forms: linear warm-up
(step + 1) / warmup, then linear or cosine decay from 1 to ``min_lr_ratio`` over the steps after warm-up, or over
the wall-clock budget ``max_time`` when one is set; the one-line refusal of an unknown schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from bertode.training.schedule import lr_factor


def trainer(**fields):
    defaults = dict(warmup_steps=4, max_steps=14, max_time=None, min_lr_ratio=0.1, schedule="linear")
    return SimpleNamespace(**{**defaults, **fields})


def decayed(schedule: str, progress: float, floor: float) -> float:
    """The closed form: 1 at progress 0, ``floor`` at progress 1."""
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_warm_up_then_decay_by_steps_is_the_closed_form(schedule):
    run = trainer(schedule=schedule)
    assert [lr_factor(step, 0.0, run) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]  # (step + 1) / warmup
    for step in range(4, 20):  # 10 decay steps after warm-up, then held at the floor
        progress = min((step - 4) / 10, 1.0)
        assert lr_factor(step, 123.0, run) == pytest.approx(decayed(schedule, progress, 0.1), abs=1e-12)
    assert lr_factor(14, 0.0, run) == pytest.approx(0.1, abs=1e-12) and lr_factor(99, 0.0, run) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_time_budget_decays_by_the_elapsed_fraction_whatever_the_step(schedule):
    run = trainer(schedule=schedule, max_time=200.0, min_lr_ratio=0.0)
    for elapsed in (0.0, 50.0, 100.0, 150.0, 200.0, 260.0):
        expected = decayed(schedule, min(elapsed / 200.0, 1.0), 0.0)
        assert lr_factor(7, elapsed, run) == pytest.approx(expected, abs=1e-12)
        assert lr_factor(1000, elapsed, run) == pytest.approx(expected, abs=1e-12)  # the step does not count
    assert lr_factor(2, 150.0, run) == 0.75  # warm-up still goes by steps
    assert lr_factor(5, -1.0, run) == 1.0  # progress is clamped at 0


def test_no_warm_up_and_a_run_no_longer_than_its_warm_up():
    assert lr_factor(0, 0.0, trainer(warmup_steps=0, max_steps=4)) == 1.0
    assert lr_factor(2, 0.0, trainer(warmup_steps=0, max_steps=4)) == pytest.approx(0.1 + 0.9 * 0.5)
    # max_steps == warmup_steps: the decay spans one step (never zero)
    assert lr_factor(4, 0.0, trainer(max_steps=4)) == 1.0 and lr_factor(5, 0.0, trainer(max_steps=4)) == 0.1


def test_an_unknown_schedule_is_the_one_line_error():
    with pytest.raises(ValueError) as error:
        lr_factor(5, 0.0, trainer(schedule="step"))
    assert str(error.value) == "trainer.schedule='step' is invalid; allowed: 'linear', 'cosine'"
