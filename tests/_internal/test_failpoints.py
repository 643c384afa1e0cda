"""Injected I/O errors (ENOSPC, EIO) at every durable step of a save, retention delete and commit.

The real-disk versions (a full tmpfs, a read-only remount) live in
tests/manager/test_checkpoint_manager.py and tests/manager/test_async_save.py; these reach the points
a real full disk cannot target one by one (a failed fsync, a failed rename of the manifest or of the
checkpoint directory).
"""

from __future__ import annotations

import errno
from functools import partial
from pathlib import Path

import pytest
import torch

import unbroken
from tests import helpers
from unbroken import CheckpointManager, StorageError
from unbroken._internal import failpoints

make_state = partial(helpers.make_state, sizes=(64, 64), epoch=0,
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))

SAVE_POINTS = ["staging.create", "file.create", "file.write", "file.fsync", "manifest.write", "manifest.rename",
               "commit.rename", "commit.fsync"]
ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO}



def bump(state: dict, value: float) -> None:
    with torch.no_grad():
        state["model"].weight.fill_(value)
    state["epoch"] = int(value)


def committed(run: Path) -> list[int]:
    records = unbroken.list_checkpoints(run, verify=True)
    assert all(r.valid for r in records), [r.problem for r in records if not r.valid]
    return [r.step for r in records]


def debris(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if p.name.startswith((".staging-", ".trash-"))]


def weight_of(run: Path, step: int) -> float:
    state = make_state()
    unbroken.load(run / f"step_{step:09d}", state, rng=False)
    return float(state["model"].weight[0, 0].detach())


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("action", ["enospc", "eio"])
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_an_io_error_at_any_point_fails_that_save_only(tmp_path: Path, point: str, action: str,
                                                       background: bool) -> None:
    run = tmp_path / "run"
    state = make_state()
    ckpt = CheckpointManager(run, state, every_steps=1, async_save=background)
    bump(state, 1.0)
    ckpt.step(1)
    ckpt.wait()
    failpoints.arm(f"{point}:1:{action}")
    bump(state, 2.0)
    with pytest.raises(StorageError, match=rf"step 2 .*injected .* at {point}.*Earlier checkpoints are intact") as info:
        ckpt.step(2)
        ckpt.wait()  # a background save's error is raised here, on the training thread
    assert info.value.errno == ERRNO[action]
    failpoints.arm(None)
    assert committed(run) == [1] and weight_of(run, 1) == 1.0
    assert debris(run) == []  # the failed save removed its staging area (or undid its commit)
    bump(state, 3.0)
    ckpt.step(3)  # training goes on and the next save works
    ckpt.close()
    assert committed(run) == [1, 3] and weight_of(run, 3) == 3.0


def test_a_failed_fsync_is_never_retried_into_a_success(tmp_path: Path) -> None:
    run, trace = tmp_path / "run", tmp_path / "trace"
    state = make_state()
    ckpt = CheckpointManager(run, state, every_steps=1, async_save=False)
    failpoints.arm("file.fsync:1:eio", trace=str(trace))
    with pytest.raises(StorageError):
        ckpt.step(1)
    passed = trace.read_text().split()
    # The first fsync failed; after it nothing of that save was written, renamed or committed.
    assert passed.count("file.fsync") == 1 and passed[-1] == "file.fsync"
    assert committed(run) == []
    ckpt.close()  # save_on_close tries step 1 again, as a new save from scratch
    assert committed(run) == [1]


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_on_save_error_warn_keeps_training(tmp_path: Path, background: bool) -> None:
    run = tmp_path / "run"
    state = make_state()
    ckpt = CheckpointManager(run, state, every_steps=1, async_save=background, on_save_error="warn")
    failpoints.arm("file.write:1:enospc")
    with pytest.warns(RuntimeWarning, match=r"checkpoint for step 1 failed, training continues: .*No space left"):
        ckpt.step(1)
        ckpt.wait()
    bump(state, 2.0)
    ckpt.step(2)
    ckpt.close()
    assert committed(run) == [2] and weight_of(run, 2) == 2.0


def test_on_save_error_warn_does_not_hide_bugs(tmp_path: Path) -> None:
    state = make_state()
    ckpt = CheckpointManager(tmp_path / "run", state, every_steps=1, async_save=False, on_save_error="warn")
    state["epoch"] = lambda: 0
    with pytest.raises(unbroken.UnserializableStateError):
        ckpt.step(1)


@pytest.mark.parametrize("point", ["delete.rename", "delete.remove"])
def test_an_io_error_in_a_retention_delete_is_a_warning(tmp_path: Path, point: str) -> None:
    run = tmp_path / "run"
    state = make_state()
    ckpt = CheckpointManager(run, state, every_steps=1, keep_last=1, async_save=False)
    bump(state, 1.0)
    ckpt.step(1)
    failpoints.arm(f"{point}:1:eio")
    bump(state, 2.0)
    with pytest.warns(RuntimeWarning, match="retention: could not delete checkpoint step 1"):
        ckpt.step(2)
    failpoints.arm(None)
    ckpt.close()
    # Either step 1 is still whole (rename failed) or it sits in the trash, never listed as a checkpoint.
    assert committed(run) == ([1, 2] if point == "delete.rename" else [2])
    state = make_state()
    again = CheckpointManager(run, state, keep_last=1, async_save=False)
    assert again.restore() == 2 and float(state["model"].weight[0, 0].detach()) == 2.0
    assert debris(run) == [] and committed(run) == [2]  # restore cleaned the trash and re-applied retention
    again.close()


@pytest.mark.parametrize("spec, problem", [
    ("file.write", "expected '<point>:<n>:<action>'"),
    ("nowhere:1:kill", "unknown point 'nowhere'"),
    ("file.write:0:kill", "positive integer"),
    ("file.write:x:kill", "positive integer"),
    ("file.write:1:explode", "unknown action 'explode'"),
])
def test_bad_failpoint_specs_are_named(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        failpoints.parse_spec(spec)
