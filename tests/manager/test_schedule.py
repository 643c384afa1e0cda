"""SaveSchedule: every N steps, every N steps tuned to a cost budget ("auto") and every M minutes,
decided on an injected clock (no waiting)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import unbroken
from tests.helpers import FakeClock
from unbroken.manager import options
from unbroken.manager.ranks import DistributedRun
from unbroken.manager.schedule import AutoInterval, SaveSchedule


def test_every_minutes_is_due_exactly_when_the_minutes_have_passed() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_minutes=2, clock=clock)
    clock.advance(119.999)
    assert not schedule.due(1)
    clock.advance(0.001)
    assert schedule.due(2)
    assert schedule.due(3)  # still due until a save is recorded


def test_the_minutes_count_from_the_last_save() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_minutes=1, clock=clock)
    clock.advance(90)
    assert schedule.due(1)
    schedule.saved()
    clock.advance(59)
    assert not schedule.due(2)
    clock.advance(1)
    assert schedule.due(3)


def test_steps_and_minutes_combine() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_steps=10, every_minutes=5, clock=clock)
    assert [s for s in range(1, 31) if schedule.due(s)] == [10, 20, 30]
    clock.advance(300)
    assert schedule.due(7)


def test_neither_rule_is_never_due() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(clock=clock)
    clock.advance(1e9)
    assert not any(schedule.due(s) for s in range(1, 100))


@pytest.mark.parametrize("kwargs, message", [
    ({"every_steps": 0}, "every_steps must be a positive integer"),
    ({"every_steps": True}, "every_steps must be a positive integer"),
    ({"every_minutes": 0}, "every_minutes must be a positive number"),
    ({"every_minutes": "5"}, "every_minutes must be a positive number"),
    ({"every_steps": "Auto"}, "every_steps must be a positive integer, 'auto' or None"),
    ({"every_steps": "auto", "max_overhead": 0}, r"max_overhead must be a share of training time between 0 and 1"),
    ({"every_steps": "auto", "max_overhead": 1}, r"max_overhead must be .* e\.g\. 0\.01 for 1%"),
    ({"every_steps": "auto", "max_overhead": 5}, "max_overhead must be a share"),
    ({"every_steps": "auto", "max_overhead": float("nan")}, "max_overhead must be a share"),
    ({"every_steps": "auto", "max_overhead": True}, "max_overhead must be a share"),
    ({"every_steps": 1000, "max_overhead": 0.02},
     r"max_overhead=0\.02 tunes every_steps='auto', but every_steps=1000; pass every_steps='auto' with it, or drop "
     r"max_overhead to keep saving every 1000 steps"),
    ({"max_overhead": 0.02}, r"but every_steps=None; pass every_steps='auto' with it"),
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SaveSchedule(**kwargs)


# -- every_steps="auto" ----------------------------------------------------------------------------------------

def train(schedule: SaveSchedule, clock: FakeClock, steps: Iterable[int], step_s: float, save_s: float) -> list[int]:
    """Report ``steps`` as the manager does, each taking ``step_s`` of training; every save due costs
    ``save_s`` on the training thread.  The steps saved."""
    saved = []
    for step in steps:
        clock.advance(step_s)
        if schedule.due(step):
            schedule.saved(step)
            clock.advance(save_s)
            schedule.save_cost(save_s)
            saved.append(step)
    return saved


def gaps(steps: list[int]) -> list[int]:
    return [b - a for a, b in zip(steps, steps[1:])]


def test_auto_interval_is_the_smallest_n_that_keeps_saves_under_max_overhead() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_steps="auto", max_overhead=0.1, clock=clock)
    # The first save (no cost known yet) comes after 100 steps; then 2 s / (N * 1 s) <= 0.1 gives N = 20.
    assert train(schedule, clock, range(1, 181), step_s=1.0, save_s=2.0) == [100, 120, 140, 160, 180]
    assert schedule.interval == 20
    default = SaveSchedule(every_steps="auto", clock=clock)  # max_overhead 0.01: N = 200
    assert train(default, clock, range(1, 701), step_s=1.0, save_s=2.0) == [100, 300, 500, 700]


def test_auto_interval_follows_changing_save_costs_smoothly() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_steps="auto", max_overhead=0.1, clock=clock)
    saved = train(schedule, clock, range(1, 141), step_s=1.0, save_s=2.0)
    saved += train(schedule, clock, range(141, 500), step_s=1.0, save_s=5.0)
    # Costs are averaged with weight 1/2 for the newest: 3.5, 4.25, 4.625, 4.8125, 4.9 s -> N = 35 ... 50.
    assert gaps(saved) == [20, 20, 20, 35, 43, 47, 49, 50, 50, 50]  # the save at 160 is the first at 5 s
    saved = train(schedule, clock, range(500, 800), step_s=1.0, save_s=0.5)
    assert gaps(saved)[-1] == 5  # cheaper saves: more often


def test_auto_interval_follows_changing_step_times_by_their_median() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_steps="auto", max_overhead=0.1, clock=clock)
    saved = train(schedule, clock, range(1, 201), step_s=1.0, save_s=2.0)
    assert gaps(saved)[-1] == 20
    clock.advance(600)  # one slow step (an evaluation) moves the median of the last 64 steps not at all
    saved = train(schedule, clock, range(201, 261), step_s=1.0, save_s=2.0)
    assert gaps(saved) == [20, 20]
    saved = train(schedule, clock, range(261, 800), step_s=0.25, save_s=2.0)
    assert gaps(saved)[-1] == 80  # 2 s / (N * 0.25 s) <= 0.1


def test_auto_interval_counts_steps_reported_in_jumps_and_excludes_save_time() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_steps="auto", max_overhead=0.1, clock=clock)
    # step(n) every 10 steps: 10 s between reports is 1 s a step, the 30 s of a save is not training.
    # The count starts before the first step reported (10), so the first save is 100 steps later.
    saved = train(schedule, clock, range(10, 1000, 10), step_s=10.0, save_s=30.0)
    assert saved == [110, 410, 710]  # then 30 s / (N * 1 s) <= 0.1: N = 300


def test_auto_interval_stays_within_its_bounds() -> None:
    tuner = AutoInterval(0.01, first=10, min_steps=5, max_steps=50)
    assert tuner.wanted() == 10  # nothing measured yet
    tuner.step_took(1.0)
    tuner.save_took(0.0)
    assert tuner.wanted() == 5
    for _ in range(10):
        tuner.save_took(1e6)
    assert tuner.wanted() == 50
    clock = FakeClock()
    schedule = SaveSchedule(every_steps="auto", clock=clock)
    free = train(schedule, clock, range(1, 106), step_s=1.0, save_s=0.0)
    assert free == [100, 101, 102, 103, 104, 105]  # a save that costs nothing: every step (min_steps=1)
    costly = SaveSchedule(every_steps="auto", clock=clock)
    assert train(costly, clock, range(1, 101), step_s=1e-9, save_s=60.0) == [100]
    assert costly.interval == 100_000
    with pytest.raises(ValueError, match="1 <= min_steps <= first <= max_steps"):
        AutoInterval(first=10, min_steps=20)


def test_auto_interval_restarts_counting_at_saves_forced_elsewhere() -> None:
    clock = FakeClock()
    schedule = SaveSchedule(every_steps="auto", max_overhead=0.1, every_minutes=10, clock=clock)
    assert train(schedule, clock, range(1, 121), step_s=1.0, save_s=2.0) == [100, 120]
    schedule.saved(130)  # an explicit save() or a restore at step 130
    assert [s for s in range(131, 160) if schedule.due(s)][0] == 150
    schedule.saved(150)
    clock.advance(600)  # every_minutes still saves whatever N is
    assert schedule.due(151)


class CostlyState:
    """A state entry whose ``state_dict()`` advances the fake clock: what a save costs the training thread."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds, self.weight = clock, seconds, torch.arange(4.0)

    def state_dict(self) -> dict[str, Any]:
        self.clock.advance(self.seconds)
        return {"weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight = state["weight"]


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_with_auto_interval_saves_at_the_tuned_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             async_save: bool) -> None:
    clock = FakeClock()
    monkeypatch.setattr(options, "SaveSchedule", partial(SaveSchedule, clock=clock))
    state = {"model": CostlyState(clock, 2.0)}
    ckpt = unbroken.CheckpointManager(tmp_path / "run", state, every_steps="auto", max_overhead=0.1,
                                      async_save=async_save, save_on_close=False)
    started = []
    for step in range(1, 171):
        clock.advance(1.0)  # the training step
        if ckpt.step(step):
            started.append(step)
        if step == 150:
            ckpt.save(wait=True)  # explicit: the interval counts from here
    ckpt.close()
    assert started == [100, 120, 140, 170]
    assert [record.step for record in ckpt.list()] == [100, 120, 140, 150, 170]
    resumed = unbroken.CheckpointManager(tmp_path / "run", {"model": CostlyState(clock, 2.0)}, every_steps="auto",
                                         save_on_close=False)
    assert resumed.restore() == 170
    assert resumed._schedule.due(269) is False and resumed._schedule.due(270) is True  # 100 steps after 170
    resumed.close()


def test_manager_refuses_bad_auto_settings_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_steps must be a positive integer, 'auto' or None, got 'sometimes'"):
        unbroken.CheckpointManager(tmp_path / "run", {"x": 1}, every_steps="sometimes")
    with pytest.raises(ValueError, match="max_overhead must be a share of training time between 0 and 1"):
        unbroken.CheckpointManager(tmp_path / "run", {"x": 1}, every_steps="auto", max_overhead=1.5)
    with pytest.raises(ValueError, match="pass every_steps='auto' with it"):
        unbroken.CheckpointManager(tmp_path / "run", {"x": 1}, every_steps=100, max_overhead=0.05)
    assert not (tmp_path / "run").exists()


class FakeControl:
    def __init__(self, others: int) -> None:
        self.others, self.gathered, self.reductions = others, [], 0

    def any_true(self, flag: bool) -> bool:
        self.reductions += 1
        return flag

    def all_gather_json(self, value: Any) -> list[Any]:
        self.gathered.append(value)
        return [value, self.others]


def test_ranks_adopt_the_largest_auto_interval_once_per_save_and_no_collective_per_step() -> None:
    clock = FakeClock()
    control = FakeControl(others=37)
    run = DistributedRun(SimpleNamespace(control=control, is_coordinator=True))  # type: ignore[arg-type]
    schedule = run.schedule(SaveSchedule(every_steps="auto", max_overhead=0.1, clock=clock))
    assert train(schedule, clock, range(1, 200), step_s=1.0, save_s=2.0) == [100, 137, 174]
    assert control.gathered == [20, 20, 20] and control.reductions == 0  # this rank wanted 20; another 37
    control.others = 5
    assert train(schedule, clock, range(200, 240), step_s=1.0, save_s=2.0) == [211, 231]
    with_minutes = run.schedule(SaveSchedule(every_steps="auto", every_minutes=5, clock=clock))
    with_minutes.due(1)
    assert control.reductions == 1  # minutes: decided together at every step, as before
