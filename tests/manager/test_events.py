"""The run's event log (docs/EVENTS.md): what the manager writes, when, with which fields; the reader;
``on_event`` and ``ckpt.stats``.  In-process: the manager's saves are synchronous unless the test is
about the background writer, and time comes from a fake clock where figures are checked."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

import unbroken
from tests.helpers import FakeClock, SyncManager, make_state
from unbroken import CheckpointSkippedWarning
from unbroken._internal import failpoints
from unbroken.manager import checkpoint_manager, options
from unbroken.manager.event_log_format import EVENTS_FILE, read_events
from unbroken.manager.events import EventLog, SaveStats, metrics_stride
from unbroken.manager.preemption import Stops
from unbroken.manager.schedule import SaveSchedule

COMMON = {"v", "t", "event", "session", "rank"}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


class SlowState:
    """A state entry whose capture takes ``seconds`` on ``clock``: saves then have known durations."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds
        self.weights = torch.arange(16, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        self.clock.advance(self.seconds)
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The manager's monotonic clock (saves and restores are timed on it)."""
    fake = FakeClock()
    monkeypatch.setattr(options, "SaveSchedule", partial(SaveSchedule, clock=fake))
    return fake


# -- what is written, and when ---------------------------------------------------------------------

def test_a_run_logs_its_start_restore_metrics_saves_retention_and_close_in_order(tmp_path: Path,
                                                                                clock: FakeClock) -> None:
    run = tmp_path / "run"
    state = {"slow": SlowState(clock, 2.0)}
    ckpt = SyncManager(run, state, every_steps=2, keep_last=1)
    assert ckpt.restore() == 0
    for step in (1, 2, 3, 4):
        ckpt.step(step, metrics={"loss": 1.0 / step, "lr": 0.1})
    ckpt.close()
    events = read_events(run)
    assert kinds(events) == ["start", "restore", "metrics", "metrics", "save", "metrics", "metrics", "save",
                             "retention", "close"]
    assert all(set(e) >= COMMON and e["v"] == 1 and e["rank"] == 0 for e in events)
    assert len({e["session"] for e in events}) == 1
    start = events[0]
    assert (start["pid"], start["world_size"], start["run_dir"]) == (os.getpid(), 1, str(run))
    assert set(start["versions"]) == {"unbroken", "torch", "python"} and start["host"]
    restore = events[1]
    assert (restore["step"], restore["checkpoint"], restore["skipped"], restore["bytes"]) == (None, None, [], None)
    saves = of(events, "save")
    sizes = {r.step: r.size for r in unbroken.list_checkpoints(run)}
    assert [(s["step"], s["reason"], s["async"]) for s in saves] == [(2, "schedule", False), (4, "schedule", False)]
    assert saves[1]["bytes"] == sizes[4] > 0
    assert (saves[1]["stall_s"], saves[1]["commit_s"]) == (2.0, 2.0)  # the capture took 2 s; the write none
    assert saves[1]["throughput_bps"] == sizes[4] / 2.0
    assert of(events, "retention")[0]["removed"] == ["step_000000002"]
    assert [(m["step"], m["values"]) for m in of(events, "metrics")][:2] == [(1, {"loss": 1.0, "lr": 0.1}),
                                                                            (2, {"loss": 0.5, "lr": 0.1})]
    assert events[-1]["step"] == 4 and events[-1]["error"] is None


def test_close_saving_the_last_step_logs_a_close_save(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path / "run", make_state(), every_steps=10)
    ckpt.step(3)
    ckpt.save(step=3)
    ckpt.step(4)
    ckpt.close()
    saves = of(read_events(tmp_path / "run"), "save")
    assert [(s["step"], s["reason"]) for s in saves] == [(3, "explicit"), (4, "close")]


def test_a_resume_logs_the_restored_step_and_each_skipped_checkpoint_with_its_reason(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with SyncManager(run, make_state(), every_steps=1, save_on_close=False) as ckpt:
        ckpt.step(1)
        ckpt.step(2)
    data = next(p for p in (run / "step_000000002").iterdir() if p.name != "manifest.json")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.write_bytes(bytes(raw))
    ckpt = SyncManager(run, make_state(seed=5))
    with pytest.warns(CheckpointSkippedWarning):
        assert ckpt.restore() == 1
    ckpt.close()
    events = read_events(run)
    (quarantine,) = of(events, "quarantine")
    (restore,) = of(events, "restore")
    assert quarantine["name"] == "step_000000002" and quarantine["to"].startswith("corrupt-step_000000002-")
    assert "checksum" in quarantine["reason"] or "corrupt" in quarantine["reason"]
    assert (restore["step"], restore["checkpoint"]) == (1, "step_000000001")
    assert restore["bytes"] == unbroken.list_checkpoints(run)[0].size
    assert [s["name"] for s in restore["skipped"]] == ["step_000000002"]
    assert restore["skipped"][0]["reason"] and "\n" not in restore["skipped"][0]["reason"]
    assert kinds(events).index("quarantine") < kinds(events).index("restore")


def test_a_stop_signal_logs_the_stop_then_its_save_then_close(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path / "run", make_state(), on_stop="raise", stop_signals=["SIGUSR1"])
    ckpt.step(1)
    signal.raise_signal(signal.SIGUSR1)
    with pytest.raises(unbroken.Preempted):
        ckpt.step(2)
    events = read_events(tmp_path / "run")
    assert kinds(events)[-3:] == ["stop", "save", "close"]
    stop, save, _ = events[-3:]
    assert (stop["step"], stop["cause"], stop["signal"]) == (2, "signal", "SIGUSR1")
    assert (save["step"], save["reason"]) == (2, "stop")


def test_a_max_runtime_stop_is_logged_with_its_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wall = FakeClock(start=time.time())
    monkeypatch.setattr(checkpoint_manager, "Stops", partial(Stops, clock=wall, timer=wall))
    ckpt = SyncManager(tmp_path / "run", make_state(), on_stop="raise", max_runtime=1.0, deadline_margin=0.2)
    with pytest.raises(unbroken.Preempted):
        for step in range(1, 10_000):
            wall.advance(0.02)
            ckpt.step(step)
    (stop,) = of(read_events(tmp_path / "run"), "stop")
    assert (stop["cause"], stop["signal"]) == ("max_runtime", None)


def test_a_failed_save_is_logged_and_counted_and_training_goes_on(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path / "run", make_state(), every_steps=1, on_save_error="warn")
    failpoints.arm("file.write:1:enospc")
    try:
        with pytest.warns(RuntimeWarning, match="checkpoint for step 1 failed, training continues"):
            ckpt.step(1)
    finally:
        failpoints.arm(None)
    ckpt.step(2)
    ckpt.close()
    events = read_events(tmp_path / "run")
    (failed,) = of(events, "save_failed")
    assert failed["step"] == 1 and "No space left" in failed["error"]
    assert [s["step"] for s in of(events, "save")] == [2]
    assert (ckpt.stats.saves, ckpt.stats.failed_saves, ckpt.stats.step) == (1, 1, 2)


def test_a_background_save_is_logged_once_committed_with_its_stall(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []
    ckpt = unbroken.CheckpointManager(tmp_path / "run", make_state(), every_steps=1, on_event=got.append)
    ckpt.step(1)
    ckpt.wait()
    ckpt.close()
    (save,) = of(got, "save")
    assert save["async"] is True and save["step"] == 1
    assert save["stall_s"] >= 0 and save["commit_s"] > 0 and save["bytes"] > 0
    assert ckpt.stats.step == 1 and ckpt.stats.saves == 1


# -- stats and on_event ---------------------------------------------------------------------------

def test_stats_hold_the_last_saves_figures_and_the_totals(tmp_path: Path, clock: FakeClock) -> None:
    ckpt = SyncManager(tmp_path / "run", {"slow": SlowState(clock, 3.0)}, every_steps=1)
    assert ckpt.stats == SaveStats()
    ckpt.step(1)
    ckpt.step(2)
    stats = ckpt.stats
    size = unbroken.list_checkpoints(tmp_path / "run")[-1].size
    assert stats == SaveStats(step=2, bytes=size, stall_s=3.0, commit_s=3.0, throughput_bps=size / 3.0, saves=2,
                              failed_saves=0, total_stall_s=6.0)
    assert stats.scalars() == {"checkpoint/bytes": size, "checkpoint/stall_s": 3.0, "checkpoint/commit_s": 3.0,
                               "checkpoint/throughput_bps": size / 3.0, "checkpoint/saves": 2.0,
                               "checkpoint/failed_saves": 0.0, "checkpoint/total_stall_s": 6.0}
    with pytest.raises(AttributeError):
        stats.saves = 5  # type: ignore[misc]
    ckpt.close()


def test_on_event_receives_the_same_events_as_the_log(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []
    with SyncManager(tmp_path / "run", make_state(), every_steps=2, keep_last=1, on_event=got.append) as ckpt:
        for step in range(1, 6):
            ckpt.step(step, metrics={"loss": float(step)})
    assert got == read_events(tmp_path / "run")
    assert {"start", "save", "retention", "metrics", "close"} <= set(kinds(got))


def test_an_on_event_that_raises_warns_once_and_never_breaks_training(tmp_path: Path) -> None:
    def broken(event: dict[str, Any]) -> None:
        raise KeyError(event["event"])

    with pytest.warns(RuntimeWarning, match="on_event callback raised KeyError") as warned:
        with SyncManager(tmp_path / "run", make_state(), every_steps=1, on_event=broken) as ckpt:
            for step in range(1, 4):
                ckpt.step(step)
    assert sum("on_event" in str(w.message) for w in warned) == 1
    assert [r.step for r in unbroken.list_checkpoints(tmp_path / "run")] == [1, 2, 3]
    assert len(of(read_events(tmp_path / "run"), "save")) == 3  # the log is written all the same


def test_events_false_writes_no_log_but_on_event_still_gets_the_events(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []
    with SyncManager(tmp_path / "run", make_state(), every_steps=1, events=False, on_event=got.append) as ckpt:
        ckpt.step(1)
    assert not (tmp_path / "run" / EVENTS_FILE).exists()
    assert kinds(got) == ["start", "save", "close"]


def test_a_bad_on_event_is_refused_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="on_event must be a function"):
        SyncManager(tmp_path / "run", make_state(), on_event="print")


# -- never costs the training ---------------------------------------------------------------------

def test_an_unwritable_log_never_breaks_a_save_and_warns_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / EVENTS_FILE).mkdir(parents=True)  # a directory where the log should be
    got: list[dict[str, Any]] = []
    with pytest.warns(RuntimeWarning, match="event log .*events.jsonl cannot be written") as warned:
        with SyncManager(run, make_state(), every_steps=1, on_event=got.append) as ckpt:
            for step in range(1, 4):
                ckpt.step(step, metrics={"loss": 1.0})
    assert sum("event log" in str(w.message) for w in warned) == 1
    assert [r.step for r in unbroken.list_checkpoints(run, verify=True) if r.valid] == [1, 2, 3]
    assert len(of(got, "save")) == 3  # on_event still hears everything


def test_the_reader_skips_a_torn_last_line_and_the_next_writer_starts_a_fresh_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with SyncManager(run, make_state(), every_steps=1) as ckpt:
        ckpt.step(1)
    before = read_events(run)
    with open(run / EVENTS_FILE, "ab") as log:  # a crash in the middle of a line
        log.write(b'{"v":1,"t":1700000000.0,"event":"save","session":"x","rank":0,"st')
    assert read_events(run) == before
    with SyncManager(run, make_state(), every_steps=1) as ckpt:
        ckpt.restore()
        ckpt.step(2)
    after = read_events(run)
    assert after[:len(before)] == before
    assert kinds(after[len(before):]) == ["start", "restore", "save", "close"]


def test_the_reader_skips_unknown_event_types_and_keeps_unknown_fields(tmp_path: Path) -> None:
    lines = [{"v": 1, "t": 1.0, "event": "start", "session": "a", "rank": 0, "new_field": [1]},
             {"v": 2, "t": 2.0, "event": "teleport", "session": "a", "rank": 0},
             "not an object", {"v": 1, "event": "close"}]
    (tmp_path / EVENTS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines) + "garbage\n")
    assert read_events(tmp_path) == [lines[0]]
    assert read_events(tmp_path / "no-such-run") == []


def test_metrics_sampling_bounds_the_log(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []
    log = EventLog(None, on_event=got.append)
    for step in range(1, 200_001):
        log.metrics(step, {"loss": 0.5})
    steps = [e["step"] for e in got]
    assert steps[:1999] == list(range(1, 2000))  # every step at first
    assert all(b - a == metrics_stride(b) for a, b in zip(steps, steps[1:]))
    assert len(steps) < 2000 + 1000 * 7  # ~1,000 lines per doubling: 2,000 + 1,000 * log2(200,000 / 2,000)
    assert [metrics_stride(s) for s in (0, 1999, 2000, 3999, 4000, 10**9)] == [1, 1, 2, 2, 4, 2**19]


def test_a_metrics_line_keeps_numbers_and_bounds_their_count(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []
    log = EventLog(None, on_event=got.append)
    log.metrics(1, {"loss": float("nan"), "ok": True, "n": 3, **{f"m{i}": float(i) for i in range(100)}})
    values = got[0]["values"]
    assert (values["loss"], values["ok"], values["n"]) == (None, 1, 3)
    assert len(values) == 32


# -- object stores ---------------------------------------------------------------------------------

def test_a_url_run_uploads_each_sessions_log_as_its_own_object(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://events-{tmp_path.name}/run"
    for steps in ((1, 2), (3,)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointSkippedWarning)
            with unbroken.CheckpointManager(url, make_state(), every_steps=1, async_save=False) as ckpt:
                ckpt.restore()
                for step in steps:
                    ckpt.step(step)
    events = read_events(url)
    assert kinds(events) == ["start", "restore", "save", "save", "close", "start", "restore", "save", "close"]
    assert len({e["session"] for e in events[:5]} | {e["session"] for e in events[5:]}) == 2
    assert of(events, "restore")[1]["step"] == 2


# -- the TensorBoard example ------------------------------------------------------------------------

def test_the_tensorboard_example_logs_the_save_figures_or_says_what_it_needs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process: it writes event files where tensorboard is installed; elsewhere it says so and exits 0."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tensorboard_logging", EXAMPLES / "tensorboard_logging.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = tmp_path / "run"
    assert example.main(["--run-dir", str(run), "--steps", "4", "--save-interval", "2"]) == 0
    if importlib.util.find_spec("tensorboard") is None:
        assert "needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
        return
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [s["step"] for s in of(read_events(run), "save")] == [2, 4]
