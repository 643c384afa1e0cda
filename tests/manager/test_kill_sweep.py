"""The kill sweep in CI: 30 SIGKILLs at failpoints inside real saves (15 sync, 15 async), each resumed.

Replay a failure with the seed and index in its message: ``UNBROKEN_SWEEP_SEED=<seed> pytest -k ...``.
The long sweep (>= 200 points) is ``bench/kill_sweep.py``; figures in docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.killsweep import Reference, choose_points, kill_and_resume, reference_run

POINTS_PER_MODE = 15
SEED = int(os.environ.get("UNBROKEN_SWEEP_SEED", "0"))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def references(sweep_dir: Path) -> dict[str, Reference]:
    return {mode: reference_run(sweep_dir, mode) for mode in ("sync", "async")}


def test_the_reference_run_passes_every_kind_of_point(references: dict[str, Reference]) -> None:
    from unbroken._internal.failpoints import POINTS

    for reference in references.values():
        assert set(reference.points) == set(POINTS)  # every phase of a save is a kill candidate
        assert sorted(reference.digests) == list(range(1, 13))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("slot", range(POINTS_PER_MODE))
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_a_failpoint_loses_nothing(sweep_dir: Path, references: dict[str, Reference], mode: str,
                                              slot: int) -> None:
    reference = references[mode]
    index = choose_points(reference, POINTS_PER_MODE, SEED)[slot]
    outcome = kill_and_resume(sweep_dir, reference, index)
    assert outcome.killed and not outcome.problems, (
        f"seed {SEED}, {mode} point {index} ({outcome.point}): {outcome.problems}")
    assert outcome.restored >= outcome.committed_before_kill
