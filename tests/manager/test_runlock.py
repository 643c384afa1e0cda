"""One writer per run directory: a second live process gets RunLockedError; a dead one frees the run."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.helpers import FakeClock
from unbroken import CheckpointManager, RunDirectoryReplacedError, RunLockedError, list_checkpoints
from unbroken.manager import checkpoint_manager
from unbroken.manager.runlock import RunLock

# Holds the run until the file ``release`` appears or ``hold`` seconds pass, whichever is first.
HOLDER = textwrap.dedent("""
    import os, sys, time, torch, unbroken
    run, hold, release = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    state = {"w": torch.ones(4)}
    ckpt = unbroken.CheckpointManager(run, state, every_steps=1, async_save=False)
    ckpt.step(1)
    print("holding", flush=True)
    deadline = time.monotonic() + hold
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    ckpt.close()
""")


def hold_lock(tmp_path: Path, run: Path, seconds: float) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(seconds), str(tmp_path / "release")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "holding", proc.stderr.read() if proc.stderr else line
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = hold_lock(tmp_path, run, 60)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another CheckpointManager \(pid {proc.pid} on .*Fix:"):
            CheckpointManager(run, {"w": torch.zeros(4)})
        # Nothing of the refused manager touched the run: the holder's checkpoint and log are all there is.
        assert sorted(p.name for p in run.iterdir()) == [".lock", "events.jsonl", "step_000000001"]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_killed_holder_frees_the_run_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = hold_lock(tmp_path, run, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    state = {"w": torch.zeros(4)}
    ckpt = CheckpointManager(run, state, async_save=False)  # no stale lock after a crash
    assert ckpt.restore() == 1 and torch.equal(state["w"], torch.ones(4))
    ckpt.close()


def test_lock_timeout_waits_for_a_predecessor_that_is_still_exiting(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    proc = hold_lock(tmp_path, run, 60)
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        # The new manager found the run held and waits: only now does the predecessor begin to exit.
        polls.append(seconds)
        (tmp_path / "release").touch()
        time.sleep(seconds)

    monkeypatch.setattr(checkpoint_manager, "RunLock", partial(RunLock, sleep=sleep))
    ckpt = CheckpointManager(run, {"w": torch.zeros(4)}, lock_timeout=60)
    assert polls  # it really waited for the holder
    assert proc.wait(timeout=30) == 0
    ckpt.close()


def test_lock_timeout_expires_with_the_wait_in_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    proc = hold_lock(tmp_path, run, 60)
    clock = FakeClock()
    monkeypatch.setattr(checkpoint_manager, "RunLock", partial(RunLock, clock=clock, sleep=clock.sleep))
    start = clock()
    try:
        with pytest.raises(RunLockedError, match=r"after waiting 0\.3 s"):
            CheckpointManager(run, {"w": torch.zeros(4)}, lock_timeout=0.3)
        assert clock() - start == pytest.approx(0.3, abs=0.05)  # polled until the timeout, no longer
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_lock_false_opts_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = hold_lock(tmp_path, run, 60)
    try:
        ckpt = CheckpointManager(run, {"w": torch.zeros(4)}, lock=False, async_save=False)
        assert ckpt.restore() == 1
        ckpt.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_closing_frees_the_run_for_another_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = CheckpointManager(run, {"w": torch.ones(4)}, every_steps=1, async_save=False)
    ckpt.step(1)
    ckpt.close()
    proc = hold_lock(tmp_path, run, 0)  # would fail to start if the lock were still held
    assert proc.wait(timeout=60) == 0


def test_a_newer_manager_in_the_same_process_takes_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = CheckpointManager(run, {"w": torch.ones(4)}, every_steps=1)
    first.step(1)  # an async save may still be in flight: the takeover lets it commit
    with pytest.warns(RuntimeWarning, match="earlier CheckpointManager in this process"):
        second = CheckpointManager(run, {"w": torch.zeros(4)}, async_save=False)
    with pytest.raises(RuntimeError, match="a newer CheckpointManager took over"):
        first.step(2)
    state = {"w": torch.zeros(4)}
    second.state = state
    assert second.restore() == 1 and torch.equal(state["w"], torch.ones(4))
    second.close()
    first.close()  # closing a replaced manager is harmless


def test_a_dropped_manager_frees_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = CheckpointManager(run, {"w": torch.ones(4)}, async_save=False)
    del ckpt
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no takeover warning: the dropped manager released the run
        CheckpointManager(run, {"w": torch.ones(4)}, async_save=False).close()


def test_a_symlinked_lock_file_is_not_followed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / ".lock").symlink_to(victim)
    with pytest.raises(OSError, match="run lock.*symlink"):
        CheckpointManager(run, {"w": torch.ones(4)})
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("on_save_error", ["raise", "warn"])
def test_a_writer_whose_run_directory_was_deleted_never_touches_the_next_runs_checkpoints(
        tmp_path: Path, on_save_error: str) -> None:
    """rm -rf run under writer A takes A's lock with it; job B then locks the new run at that path.
    A must stop writing there: no checkpoint of A's lands in B's run, and A's retention deletes none of B's.
    It stops even with on_save_error="warn": no later save of A's could ever succeed."""
    run = tmp_path / "run"
    first = CheckpointManager(run, {"w": torch.ones(4)}, every_steps=1, keep_last=3, async_save=False,
                              on_save_error=on_save_error)
    for step in range(1, 4):
        first.step(step)
    shutil.rmtree(run)
    # B stands for a job in another process, which A's vanished lock does not refuse (in this process a
    # second locked manager would take A over instead: test_a_newer_manager_in_the_same_process_takes_over).
    second = CheckpointManager(run, {"w": torch.full((4,), 2.0)}, every_steps=1, async_save=False, lock=False)
    for step in range(1, 4):
        second.step(step)
    theirs = sorted(p.name for p in run.iterdir())
    with pytest.raises(RunDirectoryReplacedError, match=rf"{run}: the run directory was deleted or replaced"):
        first.step(4)
    with pytest.raises(RunDirectoryReplacedError, match="Fix: restart the job"):
        first.save(5)
    assert sorted(p.name for p in run.iterdir()) == theirs
    assert [(r.step, r.valid) for r in list_checkpoints(run, verify=True)] == [(1, True), (2, True), (3, True)]
    state = {"w": torch.zeros(4)}
    second.state = state
    assert second.restore() == 3 and torch.equal(state["w"], torch.full((4,), 2.0))
    second.close()
