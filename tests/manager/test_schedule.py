"""SaveSchedule: every N steps and every M minutes, decided on an injected clock (no waiting)."""

from __future__ import annotations

import pytest

from tests.helpers import FakeClock
from unbroken.manager.schedule import SaveSchedule


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
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SaveSchedule(**kwargs)
