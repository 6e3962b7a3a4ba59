"""The learning-rate schedule and the wall-clock budget of a training run, as two small objects.

``Schedule``: linear warmup, then a cosine from 1 to ``min_lr_ratio`` at the last planned step. Its value is a
pure function of the step and its plan (the last step, and the steps where the plan changed), and that plan
is what a checkpoint saves.

``Budget``: for a run with ``max_minutes``, measures the rate of steps and re-plans the schedule's last step so
that the cosine ends inside the budget; a guard stops a run that falls behind its plan anyway.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable


def warmup_cosine(step: int, warmup_steps: int, min_lr_ratio: float, progress: float) -> float:
    """The schedule's shape: ``(step + 1) / warmup_steps`` during warmup, then a cosine from 1 down to
    ``min_lr_ratio`` as ``progress`` goes from 0 to 1 (clamped at 1). ``progress`` may be anything that runs
    0..1, e.g. the elapsed fraction of a wall-clock budget (experiments/bench/time_to_quality.py)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Schedule:
    """Warmup + cosine over ``total`` steps; ``factor(step)`` multiplies each param group's base lr.

    A run with a time budget changes ``total`` as it measures its rate (``replan``). ``replans`` holds the
    (step, cosine position) of each change, from which the position runs on linearly to 1 at the new total,
    so the learning rate stays continuous (and keeps falling) instead of jumping to where a cosine over the
    new total would be."""
    warmup_steps: int
    min_lr_ratio: float
    total: int
    replans: list[tuple[int, float]] = field(default_factory=list)

    def position(self, step: int) -> float:
        """Where ``step`` is on the cosine: 0 at the end of warmup (or at the last re-plan, its position
        then), 1 at step ``total``. Without re-plans: (step - warmup) / (total - warmup)."""
        s0, p0 = self.replans[-1] if self.replans else (self.warmup_steps, 0.0)
        return p0 + (1 - p0) * (step - s0) / max(1, self.total - s0)

    def factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step`` (0-based: the factor the step after ``step`` steps uses)."""
        return warmup_cosine(step, self.warmup_steps, self.min_lr_ratio, self.position(step))

    def replan(self, step: int, total: int) -> None:
        """From ``step`` on, end the cosine at ``total``; ``factor(step)`` stays what it was."""
        self.replans.append((step, self.position(step)))
        self.total = total

    def state_dict(self) -> dict:
        """The plan, as a checkpoint's trainer state stores it (keys ``total`` and ``replans``)."""
        return {"total": self.total, "replans": list(self.replans)}

    def load_state_dict(self, state: dict) -> None:
        """Back to a saved plan; a checkpoint without one (from before time budgets) keeps this ``total``."""
        self.total = state.get("total", self.total)
        self.replans = [tuple(r) for r in state.get("replans", [])]


def steps_that_fit(step: int, elapsed_s: float, seconds_per_step: float, *, minutes: float, max_steps: int,
                   margin: float = 0.9) -> int:
    """How many steps a run can plan for (between ``step`` and ``max_steps``) so that, at the measured rate,
    training ends inside ``minutes``; ``margin`` of the remaining time is kept for steps, the rest for
    validation and checkpoints."""
    left = 60 * minutes - elapsed_s
    return max(step, min(max_steps, step + int(margin * left / max(seconds_per_step, 1e-9))))


def alone(value: float, op: str) -> float:
    """The agreement of one process: its own value (``Budget``'s ``agree`` for a single process)."""
    return value


class Budget:
    """A wall-clock budget of ``minutes`` (0: none) for this process's steps, planned on a ``Schedule``.

    At the end of warmup (the learning rate until then does not depend on the number of steps), but at least
    10 steps in, it measures the rate of this process's steps and plans the steps that fit (at most
    ``max_steps``); then every 1/8 of the steps left (at least 10) it measures again and re-plans, fewer or
    more again. So the cosine ends at a last step inside the budget: not cut off by the guard at a high
    learning rate, and no budget left unused when the first estimate was pessimistic (a machine's speed can
    drift by 1.5x). The guard (``out_of_time``) stops a run that still falls behind.

    The rate and the plan's timing belong to this process and are not saved: a resumed process measures
    afresh, and plans only when it starts before the first plan's step (the checkpoint keeps the schedule's
    plan). ``agree(value, "min" | "max")`` makes every rank of a distributed run take the same decision."""

    def __init__(self, minutes: float, max_steps: int, warmup_steps: int, *, step: int, total: int,
                 clock: Callable[[], float] = time.perf_counter, agree: Callable[[float, str], float] = alone):
        self.minutes, self.max_steps, self.clock, self.agree = minutes, max_steps, clock, agree
        self.plan_at = max(10, warmup_steps)  # the first plan's step
        self.start = clock()
        self.first_step, self.t_first = step, None  # the rate is measured from this process's second step on
        self.plan0: tuple[int, float] | None = None  # (step, time) of this process's first plan
        self.replan_every = 0
        self.stop_at = total  # the last step: the plan's, or where the guard stopped the run

    def replan(self, step: int, schedule: Schedule) -> float | None:
        """After ``step`` steps: plan again if it is due. Returns the measured seconds per step when the plan
        changed (``schedule.total`` and ``stop_at`` are the new last step), else None."""
        if step == self.first_step + 1:
            self.t_first = self.clock()
        due = step == self.plan_at if self.plan0 is None else (step - self.plan0[0]) % self.replan_every == 0
        if not (self.minutes and due and step - self.first_step > 5 and step < schedule.total):
            return None
        now = self.clock()
        # at the first plan since this process's second step (its start-up excluded); later since the first
        # plan, so the run's validations and checkpoints are in the rate
        rate = ((now - self.t_first) / (step - self.first_step - 1) if self.plan0 is None
                else (now - self.plan0[1]) / (step - self.plan0[0]))
        fit = steps_that_fit(step, now - self.start, rate, minutes=self.minutes, max_steps=self.max_steps)
        planned = int(self.agree(fit, "min"))  # every rank plans the same number of steps
        if self.plan0 is None:
            self.plan0, self.replan_every = (step, now), max(10, (planned - step) // 8)
        if planned == schedule.total:
            return None
        schedule.replan(step, planned)
        self.stop_at = planned
        return rate

    def out_of_time(self, step: int, schedule: Schedule) -> bool:
        """The guard, after ``step`` steps: True (and ``stop_at`` is ``step``) when the budget is spent before
        the planned last step; every rank stops at the same step."""
        if not (self.minutes and self.stop_at == schedule.total and step < schedule.total):
            return False
        if not self.agree(float(self.clock() - self.start > 60 * self.minutes), "max"):
            return False
        self.stop_at = step
        return True
