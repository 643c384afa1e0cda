"""The kill sweep in CI: SIGKILLs at failpoints inside real saves, sync and async, each resumed.

By default one point of every kind of failpoint in each mode (20 kills: every phase of a save,
on the training thread and on the writer thread); the full sample of 15 points per mode (30 kills)
adds a second point of some kinds and runs with ``pytest -m slow tests/manager/test_kill_sweep.py``
(``-m 'slow or not slow'`` for both).  Replay a failure with the seed and index in its message:
``UNBROKEN_SWEEP_SEED=<seed> pytest -k ...``.  The long sweep (>= 200 points) is
``bench/kill_sweep.py``; figures in docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.killsweep import TOTAL_STEPS, TRAINER, Reference, choose_points, kill_and_resume, reference_run
from tests.shared_reference import session_environment, shared_run
from unbroken._internal.failpoints import POINTS

POINTS_PER_MODE = 15
SEED = int(os.environ.get("UNBROKEN_SWEEP_SEED", "0"))
# choose_points picks one point of each kind before a second of any, so the first len(POINTS) slots
# cover every kind once; the slots after them repeat kinds and run only in the full sweep.
SLOTS = [pytest.param(slot, marks=[pytest.mark.slow] if slot >= len(POINTS) else [])
         for slot in range(POINTS_PER_MODE)]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep")


def shared_reference(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Reference:
    """The uninterrupted run of ``mode``, run once per session and shared by the xdist workers (a
    reference run is deterministic: same points, same digests)."""
    key = {"trainer": str(TRAINER), "mode": mode, "steps": TOTAL_STEPS, "env": session_environment()}
    _, saved = shared_run(tmp_path_factory, f"kill-sweep-{mode}", key,
                          lambda workdir: asdict(reference_run(workdir, mode)))
    return Reference(mode, {int(step): d for step, d in saved["digests"].items()}, saved["final"],
                     saved["points"], saved["steps"])


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    cache: dict[str, Reference] = {}

    def get(mode: str) -> Reference:
        if mode not in cache:
            cache[mode] = shared_reference(tmp_path_factory, mode)
        return cache[mode]

    return get


def test_the_reference_run_passes_every_kind_of_point(references: Callable[[str], Reference]) -> None:
    for reference in map(references, ("sync", "async")):
        assert set(reference.points) == set(POINTS)  # every phase of a save is a kill candidate
        default = choose_points(reference, POINTS_PER_MODE, SEED)[:len(POINTS)]
        assert {reference.points[i - 1] for i in default} == set(POINTS)  # what SLOTS relies on
        assert sorted(reference.digests) == list(range(1, 13))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_a_failpoint_loses_nothing(sweep_dir: Path, references: Callable[[str], Reference], mode: str,
                                              slot: int) -> None:
    reference = references(mode)
    index = choose_points(reference, POINTS_PER_MODE, SEED)[slot]
    outcome = kill_and_resume(sweep_dir, reference, index)
    assert outcome.killed and not outcome.problems, (
        f"seed {SEED}, {mode} point {index} ({outcome.point}): {outcome.problems}")
    assert outcome.restored >= outcome.committed_before_kill
