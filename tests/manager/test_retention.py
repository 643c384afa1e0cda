"""Retention policies alone and combined; the newest checkpoint survives every combination."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import unbroken
from tests.helpers import SyncManager
from unbroken import KeepBest, KeepEvery, KeepLast
from unbroken.manager.retention import Candidate, steps_to_keep

LOSSES = {10: 0.9, 20: 0.4, 30: 0.7, 40: 0.2, 50: 0.8, 60: math.nan, 70: 0.95}



def candidates(metrics: dict[int, float] = LOSSES) -> list[Candidate]:
    return [Candidate(step, {"loss": loss}) for step, loss in metrics.items()]


def test_keep_last() -> None:
    assert steps_to_keep(candidates(), [KeepLast(3)]) == {50, 60, 70}


def test_keep_best_min_and_max_ignore_nan_and_missing() -> None:
    cands = candidates() + [Candidate(80, {})]
    assert steps_to_keep(cands, [KeepBest(2, "loss", "min")]) == {20, 40, 80}
    assert steps_to_keep(cands, [KeepBest(2, "loss", "max")]) == {70, 10, 80}


def test_keep_best_ties_go_to_the_newer_step() -> None:
    cands = candidates({1: 0.5, 2: 0.5, 3: 0.9})
    assert KeepBest(1, "loss").keep(cands) == {2}


def test_keep_every_milestones() -> None:
    assert steps_to_keep(candidates(), [KeepEvery(30)]) == {30, 60, 70}


def test_policies_compose_by_union() -> None:
    kept = steps_to_keep(candidates(), [KeepLast(1), KeepBest(1, "loss"), KeepEvery(50)])
    assert kept == {70, 40, 50}


def test_no_policy_keeps_everything_and_empty_input() -> None:
    assert steps_to_keep(candidates(), []) == set(LOSSES)
    assert steps_to_keep([], [KeepLast(1)]) == set()


@settings(max_examples=200, deadline=None)
@given(steps=st.sets(st.integers(0, 10_000), min_size=1, max_size=30),
       last=st.none() | st.integers(1, 5), best=st.none() | st.integers(1, 5), every=st.none() | st.integers(1, 500),
       mode=st.sampled_from(["min", "max"]), data=st.data())
def test_newest_always_survives(steps: set[int], last: int | None, best: int | None, every: int | None,
                                mode: str, data: st.DataObject) -> None:
    metrics = {s: data.draw(st.floats(allow_nan=True, allow_infinity=True)) for s in steps}
    policies = ([KeepLast(last)] if last else []) + ([KeepBest(best, "loss", mode)] if best else []) \
        + ([KeepEvery(every)] if every else [])
    kept = steps_to_keep(candidates(metrics), policies)
    assert max(steps) in kept
    assert kept <= steps
    if last:
        assert set(sorted(steps)[-last:]) <= kept


@pytest.mark.parametrize("bad, message", [
    (lambda: KeepLast(0), "keep_last"), (lambda: KeepLast(True), "keep_last"),
    (lambda: KeepBest(1, ""), "best_metric"), (lambda: KeepBest(1, "loss", "up"), "best_mode"),
    (lambda: KeepEvery(-5), "keep_every"),
])
def test_bad_policy_arguments(bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bad()


def test_manager_applies_combined_policies_on_disk(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path, {"m": nn.Linear(2, 2)}, every_steps=10, keep_last=2, keep_best=1,
                             best_metric="loss", keep_every=30, save_on_close=False)
    for step in range(1, 71):
        ckpt.step(step, metrics={"loss": LOSSES.get(step, 1.0)})
    assert [r.step for r in ckpt.list()] == [30, 40, 60, 70]


def test_newest_survives_even_when_it_is_the_worst(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path, {"m": nn.Linear(2, 2)}, every_steps=1, keep_best=1, best_metric="acc",
                             best_mode="max", save_on_close=False)
    for step, acc in [(1, 0.9), (2, 0.5), (3, 0.1)]:
        ckpt.step(step, metrics={"acc": acc})
    assert [r.step for r in unbroken.list_checkpoints(tmp_path)] == [1, 3]


def test_retention_never_counts_or_deletes_corrupt_checkpoints(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path, {"m": nn.Linear(2, 2)}, every_steps=1, keep_last=1, save_on_close=False)
    ckpt.step(1)
    (tmp_path / "step_000000001" / "manifest.json").write_text("{")
    ckpt.step(2)
    ckpt.step(3)
    records = unbroken.list_checkpoints(tmp_path)
    assert [(r.step, r.valid) for r in records] == [(1, False), (3, True)]


def test_restore_applies_retention_left_undone_by_a_killed_run(tmp_path: Path) -> None:
    SyncManager(tmp_path, {"m": nn.Linear(2, 2)}, every_steps=1, save_on_close=False).step(1)
    # as if killed right after committing steps 2 and 3, before their retention passes ran
    for step in (2, 3):
        SyncManager(tmp_path, {"m": nn.Linear(2, 2)}, save_on_close=False).save(step=step)
    assert [r.step for r in unbroken.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert SyncManager(tmp_path, {"m": nn.Linear(2, 2)}, keep_last=2).restore() == 3
    assert [r.step for r in unbroken.list_checkpoints(tmp_path)] == [2, 3]


def test_keep_best_treats_a_metric_given_as_none_as_missing(tmp_path: Path) -> None:
    """metrics={"loss": None} (a step without an evaluation) saves, and that checkpoint is never "best"."""
    assert KeepBest(1, "loss").keep([Candidate(1, {"loss": 0.5}), Candidate(2, {"loss": None})]) == {1}
    ckpt = SyncManager(tmp_path, {"m": nn.Linear(2, 2)}, every_steps=1, keep_best=1, best_metric="loss",
                       save_on_close=False)
    for step, loss in [(1, None), (2, 0.5), (3, None), (4, 0.9), (5, None)]:
        ckpt.step(step, metrics={"loss": loss})
    assert [(r.step, r.metrics) for r in unbroken.list_checkpoints(tmp_path)] == [(2, {"loss": 0.5}),
                                                                               (5, {"loss": None})]
