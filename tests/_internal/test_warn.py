"""Every warning is seen exactly once, at the user's line; one with no user frame is logged instead.

Each test makes a real path warn (a corrupt checkpoint skipped, a partial restore, a skipped save, a
takeover, ...) and checks the warning's file and line are the calling line of this file, whatever
the depth of the call inside the package, and that nothing logs it a second time.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import unbroken
from tests.helpers import make_mlp
from unbroken import CheckpointManager, CheckpointSkippedWarning
from unbroken._internal import failpoints
from unbroken._internal.warn import warn
from unbroken.manager import save_runner

Seen = list[warnings.WarningMessage]


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoints.arm(None)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="unbroken")
    return caplog


@contextmanager
def recorded() -> Iterator[Seen]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # no deduplication: a second copy would be recorded
        yield seen


def next_line() -> int:
    """The line after the caller's: where the call under test is."""
    return sys._getframe(1).f_lineno + 1


def assert_once_at(seen: Seen, logs: pytest.LogCaptureFixture, category: type[Warning], match: str,
                   line: int) -> None:
    hits = [w for w in seen if re.search(match, str(w.message), re.S)]
    assert len(hits) == 1, [f"{w.category.__name__}: {w.message}" for w in seen]
    assert hits[0].category is category
    assert (hits[0].filename, hits[0].lineno) == (__file__, line)
    assert [r.getMessage() for r in logs.records if re.search(match, r.getMessage(), re.S)] == []


def tiny_state(seed: int = 0) -> dict[str, Any]:
    return {"model": make_mlp(seed), "epoch": 0}


def save_steps(run: Path, steps: tuple[int, ...] = (1, 2)) -> None:
    state = tiny_state()
    with CheckpointManager(run, state, every_steps=1, async_save=False, save_on_close=False) as ckpt:
        for step in steps:
            state["epoch"] = step
            ckpt.step(step)


def corrupt_newest(run: Path) -> None:
    data = sorted(run.glob("step_*"))[-1] / "rank00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x10  # tensor data: the checksum no longer matches
    data.write_bytes(bytes(raw))


def test_a_corrupt_checkpoint_skipped_by_restore(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    save_steps(tmp_path)
    corrupt_newest(tmp_path)
    ckpt = CheckpointManager(tmp_path, tiny_state(1), async_save=False)
    with recorded() as seen:
        line = next_line()
        assert ckpt.restore() == 1
    ckpt.close()
    assert_once_at(seen, logs, CheckpointSkippedWarning, r"skipping checkpoint .*step_000000002", line)


def test_a_corrupt_checkpoint_skipped_by_unbroken_load(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    save_steps(tmp_path)
    corrupt_newest(tmp_path)
    with recorded() as seen:
        line = next_line()
        assert unbroken.load(tmp_path, tiny_state(1)).step == 1
    assert_once_at(seen, logs, CheckpointSkippedWarning, r"skipping checkpoint .*step_000000002", line)


def test_a_partial_restore_with_strict_false(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    save_steps(tmp_path, (1,))
    live = {**tiny_state(1), "extra": 3}
    ckpt = CheckpointManager(tmp_path, live, async_save=False, strict=False)
    with recorded() as seen:
        line = next_line()
        assert ckpt.restore() == 1
    ckpt.close()
    assert_once_at(seen, logs, UserWarning, r"loading with strict=False; skipped:.*'extra'", line)


def test_a_save_skipped_while_another_is_in_flight(tmp_path: Path, logs: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    written = threading.Event()
    real = save_runner.write_checkpoint

    def held_until_released(*args: Any, **kwargs: Any) -> Any:
        written.wait(timeout=60)  # the test releases it; the timeout only bounds a broken test
        return real(*args, **kwargs)

    monkeypatch.setattr(save_runner, "write_checkpoint", held_until_released)
    ckpt = CheckpointManager(tmp_path, tiny_state(), every_steps=1, when_busy="skip", save_on_close=False)
    try:
        assert ckpt.step(1) is True
        with recorded() as seen:
            line = next_line()
            assert ckpt.step(2) is False
    finally:
        written.set()
        ckpt.close()
    assert_once_at(seen, logs, RuntimeWarning, "checkpoint for step 2 skipped: the previous save is still", line)
    assert [r.step for r in unbroken.list_checkpoints(tmp_path)] == [1]


def test_a_second_manager_taking_over_the_run_lock(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    first = CheckpointManager(tmp_path, tiny_state(), async_save=False)
    with recorded() as seen:
        line = next_line()
        second = CheckpointManager(tmp_path, tiny_state(), async_save=False)
    second.close()
    first.close()
    assert_once_at(seen, logs, RuntimeWarning, "held by an earlier CheckpointManager in this process", line)


def test_a_step_already_saved_by_an_earlier_run(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    save_steps(tmp_path, (1,))
    ckpt = CheckpointManager(tmp_path, tiny_state(), every_steps=1, async_save=False, save_on_close=False)
    with recorded() as seen:
        line = next_line()
        assert ckpt.step(1) is False
    ckpt.close()
    assert_once_at(seen, logs, RuntimeWarning, "a checkpoint for step 1 already exists", line)


def test_a_failed_save_with_on_save_error_warn(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    ckpt = CheckpointManager(tmp_path, tiny_state(), every_steps=1, async_save=False, on_save_error="warn",
                             save_on_close=False)
    failpoints.arm("file.write:1:enospc")
    with recorded() as seen:
        line = next_line()
        ckpt.step(1)
    ckpt.close()
    assert_once_at(seen, logs, RuntimeWarning, "checkpoint for step 1 failed, training continues", line)


def test_a_failed_retention_delete_on_the_training_thread(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    ckpt = CheckpointManager(tmp_path, tiny_state(), every_steps=1, keep_last=1, async_save=False)
    ckpt.step(1)
    failpoints.arm("delete.rename:1:eio")
    with recorded() as seen:
        line = next_line()
        ckpt.step(2)
    ckpt.close()
    assert_once_at(seen, logs, RuntimeWarning, "retention: could not delete checkpoint step 1", line)


def test_a_failed_retention_delete_on_the_writer_thread_is_logged_once(
        tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    ckpt = CheckpointManager(tmp_path, tiny_state(), every_steps=1, keep_last=1, async_save=True)
    ckpt.step(1)
    ckpt.wait()
    failpoints.arm("delete.rename:1:eio")
    with recorded() as seen:
        ckpt.step(2)
        ckpt.wait()  # the background save, and its retention pass, are done
    ckpt.close()
    assert [str(w.message) for w in seen] == []
    records = [r for r in logs.records if "retention: could not delete checkpoint step 1" in r.getMessage()]
    assert [(r.name, r.levelno, r.threadName.startswith("unbroken-writer")) for r in records] == [
        ("unbroken", logging.WARNING, True)]


def test_a_warning_on_a_thread_with_no_user_frame_is_logged_and_never_raises(
        logs: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # would kill a writer thread if it applied there
        thread = threading.Thread(target=warn, args=("nobody to point at", CheckpointSkippedWarning))
        thread.start()
        thread.join()
    assert [(r.name, r.levelno, r.getMessage()) for r in logs.records] == [
        ("unbroken", logging.WARNING, "nobody to point at")]


def test_a_mirror_download_that_fails_is_skipped(s3_run: Any, s3_server: Any, tmp_path: Path,
                                                 logs: pytest.LogCaptureFixture) -> None:
    state = tiny_state()
    with CheckpointManager(tmp_path / "a", state, every_steps=1, mirror_to=s3_run.url,
                           mirror_options=s3_run.storage_options, async_save=False) as ckpt:
        ckpt.step(1)
        ckpt._mirror.wait(60)  # type: ignore[union-attr]  # step 1 is uploaded before step 2 is saved
        ckpt.step(2)
    s3_server.client().delete_object(Bucket=s3_run.bucket, Key="run/step_000000002/rank00000.safetensors")
    other = CheckpointManager(tmp_path / "b", tiny_state(1), mirror_to=s3_run.url,
                              mirror_options=s3_run.storage_options, async_save=False)
    with recorded() as seen:
        line = next_line()
        assert other.restore() == 1
    other.close()
    assert_once_at(seen, logs, CheckpointSkippedWarning, r"could not download .*step_000000002", line)
