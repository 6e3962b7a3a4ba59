"""The learning-rate schedule (warmup + cosine, re-planned without a jump) and the time budget that re-plans it."""
from __future__ import annotations

import math

import pytest

import mmstory.schedule as sc
from mmstory.schedule import Budget, Schedule, steps_that_fit, warmup_cosine


def test_warmup_is_linear_by_steps_then_the_cosine_runs_to_min_lr_ratio():
    s = Schedule(warmup_steps=10, min_lr_ratio=0.1, total=110)
    assert [s.factor(i) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]  # (step + 1) / warmup
    assert s.factor(10) == 1.0  # the cosine's top, position 0
    assert s.position(60) == 0.5 and s.factor(60) == pytest.approx(0.55, abs=1e-15)
    assert s.factor(85) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)), abs=1e-15)
    assert s.factor(110) == 0.1  # the end value: lr * min_lr_ratio at the last step
    assert s.factor(200) == 0.1  # past the last step it stays there


def test_warmup_cosine_takes_any_progress_after_warmup():
    """``progress`` (e.g. the elapsed share of a wall-clock budget) replaces the step-based position."""
    assert warmup_cosine(60, 10, 0.1, progress=0.5) == Schedule(10, 0.1, total=110).factor(60)
    assert warmup_cosine(20, 10, 0.1, progress=1.0) == 0.1 == warmup_cosine(20, 10, 0.1, progress=3.0)
    assert warmup_cosine(5, 10, 0.1, progress=1.0) == 0.6  # warmup is by steps


def test_a_replan_keeps_the_learning_rate_continuous_and_falling():
    """As a budgeted run does: the factor of each step, re-planned at step 60 (longer) and 110 (shorter)."""
    s, plans, lrs = Schedule(warmup_steps=10, min_lr_ratio=0.1, total=110), {60: 160, 110: 130}, []
    for step in range(131):
        lrs.append(s.factor(step))
        if step in plans:
            s.replan(step, plans[step])
            assert s.factor(step) == lrs[-1]  # bitwise: the lr does not jump at a re-plan
    assert s.replans == [(60, 0.5), (110, 0.75)] and s.total == 130
    first = Schedule(warmup_steps=10, min_lr_ratio=0.1, total=110)
    assert lrs[:61] == [first.factor(i) for i in range(61)]  # up to the first re-plan: the planned cosine
    assert lrs[110] == first.factor(85)  # position 0.75: from 0.5 at step 60 on to 1 at 160
    assert all(b < a for a, b in zip(lrs[10:], lrs[11:])) and lrs[130] == 0.1  # falls through both, ends at min
    # a cosine recomputed over the new total instead would jump up at the re-plan
    assert Schedule(warmup_steps=10, min_lr_ratio=0.1, total=160).factor(60) > lrs[60]


def test_schedule_state_round_trip_and_checkpoints_without_a_plan():
    s = Schedule(warmup_steps=10, min_lr_ratio=0.1, total=110)
    s.replan(60, 160)
    state = s.state_dict()
    assert state == {"total": 160, "replans": [(60, 0.5)]}  # the keys a checkpoint's trainer state has
    state["replans"] = [list(r) for r in state["replans"]]  # as any serialisation may give them back
    t = Schedule(warmup_steps=10, min_lr_ratio=0.1, total=110)
    t.load_state_dict(state)
    assert t == s and [t.factor(i) for i in range(161)] == [s.factor(i) for i in range(161)]
    old = Schedule(warmup_steps=10, min_lr_ratio=0.1, total=110)
    old.load_state_dict({"step": 40})  # from before time budgets: the configured plan
    assert (old.total, old.replans) == (110, [])


def test_steps_that_fit_the_time_budget():
    # 480 s left at 1 s/step, 90% of it for steps: 432 more
    assert steps_that_fit(50, elapsed_s=60.0, seconds_per_step=1.0, minutes=9.0, max_steps=720) == 482
    assert steps_that_fit(50, elapsed_s=60.0, seconds_per_step=0.5, minutes=9.0, max_steps=720) == 720  # at most
    assert steps_that_fit(50, elapsed_s=600.0, seconds_per_step=1.0, minutes=9.0, max_steps=720) == 50  # over: stop


class Clock:
    """A fake ``time.perf_counter``: ``t`` seconds."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run_steps(budget: Budget, schedule: Schedule, clock: Clock, seconds_per_step, start: int = 0) -> list[tuple[int, int]]:
    """Step as the trainer does (``seconds_per_step(step)`` each); returns the (step, planned) re-plans."""
    plans, step = [], start
    while step < budget.stop_at:
        clock.t += seconds_per_step(step)
        step += 1
        if budget.replan(step, schedule) is not None:
            plans.append((step, schedule.total))
        budget.out_of_time(step, schedule)
    return plans


def test_budget_plans_from_the_measured_rate_then_replans_every_eighth_of_the_rest():
    clock, schedule = Clock(), Schedule(warmup_steps=50, min_lr_ratio=0.05, total=2000)
    budget = Budget(6.0, 2000, 50, step=0, total=schedule.total, clock=clock)
    # a 5 s start-up step (excluded from the rate), then 1 s a step: at step 50, 311 s left, 90% for steps
    plans = run_steps(budget, schedule, clock, lambda s: 5.0 if s == 0 else 1.0)
    assert plans[0] == (50, 50 + int(0.9 * (360 - 54) / 1.0))  # 325
    assert budget.replan_every == (325 - 50) // 8 == 34
    # then every 34 steps at the rate since the first plan (still 1 s): 90% of the time left each time, so a
    # few more steps at each check, and the run ends near its budget (356 of 360 s)
    assert plans == [(s, s + int(0.9 * (360 - (s + 4)))) for s in range(50, 323, 34)]
    assert budget.stop_at == 352 == schedule.total and clock.t == 356.0
    assert schedule.factor(352) == 0.05


def test_budget_replans_more_when_the_machine_speeds_up_but_never_beyond_steps():
    clock, schedule = Clock(), Schedule(warmup_steps=10, min_lr_ratio=0.05, total=400)
    budget = Budget(5.0, 400, 10, step=0, total=schedule.total, clock=clock)
    plans = run_steps(budget, schedule, clock, lambda s: 2.0 if s < 30 else 0.25)
    assert plans[0] == (10, 10 + int(0.9 * (300 - 20) / 2.0))  # 136: the first plan, at 2 s a step
    assert budget.replan_every == (136 - 10) // 8 == 15
    assert [s for s, _ in plans] == sorted(s for s, _ in plans) and all((s - 10) % 15 == 0 for s, _ in plans)
    assert [p for _, p in plans] == [136, 137, 190, 259, 318, 369, 400]  # more as the measured rate improves
    assert budget.stop_at == schedule.total == 400  # but never more than max_steps (cfg.steps)
    lrs = [schedule.factor(i) for i in range(10, schedule.total + 1)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] == 0.05  # falls through every re-plan


def test_budget_does_nothing_without_minutes_and_plans_once_per_process():
    clock, schedule = Clock(), Schedule(warmup_steps=10, min_lr_ratio=0.05, total=100)
    budget = Budget(0.0, 100, 10, step=0, total=schedule.total, clock=clock)
    assert run_steps(budget, schedule, clock, lambda s: 100.0) == [] and budget.stop_at == 100
    # a process resumed after the first plan's step has no rate from before: it keeps the saved plan
    schedule = Schedule(warmup_steps=10, min_lr_ratio=0.05, total=100)
    schedule.load_state_dict({"total": 60, "replans": [(10, 0.0)]})
    budget = Budget(5.0, 100, 10, step=20, total=schedule.total, clock=clock)
    assert run_steps(budget, schedule, clock, lambda s: 0.1, start=20) == [] and budget.stop_at == 60


def test_budget_guard_stops_at_the_budget_and_every_rank_agrees():
    clock, schedule = Clock(), Schedule(warmup_steps=10, min_lr_ratio=0.05, total=1000)
    asked = []

    def agree(value, op):  # as if another rank wanted 12 steps and was out of time from 10 s on
        asked.append(op)
        return min(value, 12) if op == "min" else max(value, float(clock.t >= 10))

    budget = Budget(1.0, 1000, 10, step=0, total=schedule.total, clock=clock, agree=agree)
    assert run_steps(budget, schedule, clock, lambda s: 1.0) == [(10, 12)]
    assert budget.stop_at == 10 and asked == ["max"] * 9 + ["min", "max"]  # the other rank's guard stopped it
    # alone, the guard stops a run that falls behind its plan at the step the budget is spent
    clock, schedule = Clock(), Schedule(warmup_steps=10, min_lr_ratio=0.05, total=1000)
    budget = Budget(1.0, 1000, 10, step=0, total=schedule.total, clock=clock)
    plans = run_steps(budget, schedule, clock, lambda s: 1.0 if s < 10 else 30.0)
    assert plans == [(10, 10 + int(0.9 * 50 / 1.0))]  # 55 planned at 1 s a step
    assert budget.stop_at == 12 and schedule.total == 55  # 10 s + 30 s + 30 s > 60 s


def test_the_trainer_asks_the_module_function(monkeypatch):
    """Tests of whole runs force a plan by replacing ``mmstory.schedule.steps_that_fit``."""
    monkeypatch.setattr(sc, "steps_that_fit", lambda step, elapsed_s, seconds_per_step, **kw: 17)
    clock, schedule = Clock(), Schedule(warmup_steps=10, min_lr_ratio=0.05, total=40)
    budget = Budget(10.0, 40, 10, step=0, total=schedule.total, clock=clock)
    assert run_steps(budget, schedule, clock, lambda s: 1.0) == [(10, 17)] and budget.stop_at == 17
