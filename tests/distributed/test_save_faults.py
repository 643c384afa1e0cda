"""One rank fails during a save: nothing is committed, the staging area is removed, and every rank
raises (naming the failing rank) within the timeout instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest

from unbroken import list_checkpoints

from .harness import HERE, launch, run_ok, wait_all

WORKER = HERE / "fault_worker.py"
WORLD = 3


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".staging", ".trash")))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault, mode", [("file.write:1:eio", "sync"), ("file.fsync:1:enospc", "async")])
def test_an_io_error_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path, fault: str, mode: str) -> None:
    run = tmp_path / "run"
    args = [run] + (["--async"] if mode == "async" else [])
    ranks = run_ok(WORKER, args, WORLD, tmp_path / "logs", rank_env={1: {"UNBROKEN_FAILPOINT": fault}})
    for r in ranks:
        out = r.output()
        assert "RAISED " in out and "StorageError" in out and "rank 1 failed" in out, out
        assert float(out.split("RAISED ", 1)[1].split()[0]) < 20  # well within the timeout
        assert "SAVED 2" in out, out  # the fault was transient: the next save commits
    assert [c.step for c in list_checkpoints(run, verify=True)] == [2]
    assert leftovers(run) == []


@pytest.mark.timeout(120)
def test_a_rank_killed_mid_save_makes_every_other_rank_raise(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ranks = launch(WORKER, [run], WORLD, tmp_path / "logs", rank_env={1: {"UNBROKEN_FAILPOINT": "file.write:1:kill"}})
    codes = wait_all(ranks, timeout=90)
    assert codes[1] == -9
    for r in (ranks[0], ranks[2]):
        out = r.output()
        assert codes[r.rank] == 0 and "RAISED " in out and "DistributedError" in out and "died" in out, out
        assert float(out.split("RAISED ", 1)[1].split()[0]) < 25
    assert list_checkpoints(run) == []
    assert leftovers(run) == []  # rank 0 removed the staging area


@pytest.mark.timeout(120)
def test_a_rank_that_never_joins_the_save_makes_the_others_raise_after_the_timeout(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ranks = launch(WORKER, [run], 2, tmp_path / "logs", env={"HANG_RANK": "1", "DIST_TIMEOUT": "5"})
    wait_all(ranks, timeout=90)
    out = ranks[0].output()
    assert "RAISED " in out and "DistributedError" in out and "Timed out" in out, out
    assert "did not make the same call" in out, out
    assert 4 < float(out.split("RAISED ", 1)[1].split()[0]) < 15
    assert list_checkpoints(run) == [] and leftovers(run) == []
