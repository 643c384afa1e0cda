"""Pre-emption signals and deadlines with real processes and real signals.

SIGTERM/SIGUSR1 mid-step or during an async save -> the step is saved and committed, the process
exits with EXIT_PREEMPTED (75) promptly, and a rerun continues bit-exactly.  A deadline shorter than
the run -> the process stops itself before it with a committed checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import pytest

import unbroken
from tests.helpers import FakeClock
from tests.shared_reference import session_environment, shared_run
from unbroken.manager import checkpoint_manager
from unbroken.manager.preemption import Stops, StopWatch

SCRIPT = Path(__file__).resolve().parents[1] / "preempt_train.py"
GRACE = 20.0  # seconds a scheduler would give; the tests need far less


def start(run: Path, total: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run), str(total), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line; stderr: {proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str], timeout: float = GRACE) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def stopped_step(stderr: str) -> int:
    for line in stderr.splitlines():
        if line.startswith("unbroken: stopped at step "):
            return int(line.split()[4])
    raise AssertionError(f"no stop line in stderr:\n{stderr}")


def run_to_end(run: Path, total: int, *extra: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), str(total), *extra], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("DONE")][0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The uninterrupted run's final line, run once per session and shared by the xdist workers."""
    key = {"script": str(SCRIPT), "total": 30, "env": session_environment()}
    _, record = shared_run(tmp_path_factory, "preempt", key, lambda workdir: {"done": run_to_end(workdir / "run", 30)})
    return str(record["done"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_signal_mid_step_saves_that_step_exits_75_and_resumes_exactly(
        tmp_path: Path, reference: str, sig: signal.Signals, background: bool) -> None:
    run = tmp_path / "run"
    proc = start(run, 30, "--sleep", "0.05", *(["--async"] if background else []))
    wait_for_line(proc, "STEP 8")
    sent = time.monotonic()
    proc.send_signal(sig)
    code, _, err = finish(proc)
    assert code == unbroken.EXIT_PREEMPTED, err
    assert time.monotonic() - sent < GRACE
    step = stopped_step(err)
    records = unbroken.list_checkpoints(run, verify=True)
    assert records[-1].step == step and all(r.valid for r in records)
    assert run_to_end(run, 30) == reference


def test_a_signal_during_a_slow_async_save_commits_the_stop_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, 1000, "--async", "--big", "96")  # every step starts a ~100 MB background save
    wait_for_line(proc, "STEP 3")
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=120)
    assert code == unbroken.EXIT_PREEMPTED, err
    step = stopped_step(err)
    last = max([3] + [int(line.split()[1]) for line in out.splitlines() if line.startswith("STEP")])
    assert step == last  # the step at which it stopped is the one saved, not an older one in flight
    records = unbroken.list_checkpoints(run, verify=True)
    assert records[-1].step == step and all(r.valid for r in records)


def test_a_second_signal_during_the_stop_save_changes_nothing(tmp_path: Path, reference: str) -> None:
    run = tmp_path / "run"
    proc = start(run, 30, "--big", "64")
    wait_for_line(proc, "STEP 5")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGUSR1)
    code, _, err = finish(proc, timeout=120)
    assert code == unbroken.EXIT_PREEMPTED, err
    records = unbroken.list_checkpoints(run, verify=True)
    assert records[-1].step == stopped_step(err) and all(r.valid for r in records)
    assert run_to_end(run, 30, "--big", "64") == reference


def test_a_deadline_shorter_than_the_run_stops_before_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, 10_000, "--sleep", "0.05", "--max-runtime", "4", "--margin", "1")
    wait_for_line(proc, "START")
    manager_created_before = time.time()  # the manager's 4 s started before it printed START
    code, out, err = finish(proc, timeout=60)
    assert code == unbroken.EXIT_PREEMPTED, err
    assert "deadline" in err
    step = stopped_step(err)
    last = unbroken.list_checkpoints(run, verify=True)[-1]
    assert last.step == step
    assert last.created is not None and last.created < manager_created_before + 4  # saved before the limit
    assert f"STEP {step + 1}" not in out  # it stopped instead of starting another step


def test_a_deadline_from_slurm_stops_the_job(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_END_TIME": str(int(time.time()) + 6)}
    proc = start(run, 10_000, "--sleep", "0.05", "--margin", "2", env=env)
    code, _, err = finish(proc, timeout=60)
    assert code == unbroken.EXIT_PREEMPTED, err
    assert unbroken.list_checkpoints(run, verify=True)[-1].step == stopped_step(err)


# -- in this process: the handler, chaining, options --------------------------------------------------

def tiny_state() -> dict:
    import torch

    return {"w": torch.arange(4.0), "epoch": 0}


def test_on_stop_raise_gives_a_catchable_preempted_after_the_commit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1)
    ckpt = unbroken.CheckpointManager(run, tiny_state(), every_steps=100, on_stop="raise")
    ckpt.step(1)
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(unbroken.Preempted, match=r"stopped at step 2 \(received SIGUSR1\)") as info:
        ckpt.step(2)
    assert info.value.step == 2
    assert [r.step for r in unbroken.list_checkpoints(run, verify=True)] == [2]
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers are given back at the stop
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.step(3)


def test_a_previous_handler_is_chained(tmp_path: Path) -> None:
    seen: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    ckpt = unbroken.CheckpointManager(tmp_path / "run", tiny_state(), on_stop="raise", async_save=False)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert seen == [signal.SIGUSR1]
    with pytest.raises(unbroken.Preempted):
        ckpt.step(1)
    os.kill(os.getpid(), signal.SIGUSR1)  # after the stop, the user's handler is back on its own
    assert seen == [signal.SIGUSR1, signal.SIGUSR1]


def test_stop_signals_none_installs_nothing(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    ckpt = unbroken.CheckpointManager(tmp_path / "run", tiny_state(), stop_signals=None)
    assert signal.getsignal(signal.SIGTERM) == before
    ckpt.close()


def test_close_gives_the_handlers_back(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    ckpt = unbroken.CheckpointManager(tmp_path / "run", tiny_state(), stop_signals=["TERM", "SIGUSR2"])
    assert signal.getsignal(signal.SIGTERM) != before
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_in_process_deadline_stops_with_a_committed_checkpoint(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(start=time.time())
    monkeypatch.setattr(checkpoint_manager, "Stops", partial(Stops, clock=clock, timer=clock))
    run = tmp_path / "run"
    ckpt = unbroken.CheckpointManager(run, tiny_state(), on_stop="raise", deadline=clock() + 1.0,
                                      deadline_margin=0.2, async_save=False)
    with pytest.raises(unbroken.Preempted, match="deadline") as info:
        for step in range(1, 10_000):
            clock.advance(0.02)
            ckpt.step(step)
    assert unbroken.list_checkpoints(run)[-1].step == info.value.step
    assert clock() < ckpt.config.deadline  # it stopped before the deadline, not after


def test_the_stopwatch_stops_when_a_step_and_a_save_no_longer_fit_before_the_deadline() -> None:
    clock = FakeClock()
    watch = StopWatch([], deadline=clock() + 100, margin=5, clock=clock, timer=clock)
    watch.step_done()
    for _ in range(3):
        clock.advance(10)  # steps of 10 s
        watch.step_done()
    watch.save_took(20)
    assert watch.reason() is None  # 70 s left, 10 + 20 + 5 needed
    clock.advance(30)
    assert watch.reason() is None  # 40 s left
    clock.advance(6)
    assert watch.reason() == "deadline in 34 s, and a step plus a save take up to 35 s"


def test_a_deadline_already_passed_stops_at_once() -> None:
    clock = FakeClock()
    watch = StopWatch([], deadline=clock() - 1, margin=0, clock=clock, timer=clock)
    assert watch.reason() == "deadline in 0 s, and a step plus a save take up to 0 s"


@pytest.mark.parametrize("kwargs, message", [
    ({"on_stop": "quit"}, "on_stop must be 'exit' or 'raise'"),
    ({"stop_signals": ["SIGKILL"]}, "cannot be caught"),
    ({"stop_signals": ["SIGNOPE"]}, "'SIGNOPE' is not a signal"),
    ({"max_runtime": -1}, "max_runtime must be a number of seconds >= 0"),
    ({"deadline_margin": float("nan")}, "deadline_margin must be"),
])
def test_bad_stop_settings_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unbroken.CheckpointManager(tmp_path / "run", tiny_state(), **kwargs)


def test_slurm_end_time_from_the_environment_and_from_squeue(tmp_path: Path) -> None:
    from unbroken.manager.preemption import slurm_end_time

    assert slurm_end_time({"PATH": ""}) is None  # not in a SLURM job
    assert slurm_end_time({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1900000000", "PATH": ""}) == 1900000000.0
    # Without the variable, squeue is asked (a stand-in executable here: there is no SLURM on this machine).
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/sh\n[ \"$3\" = 7 ] && echo 2030-01-02T03:04:05\n")
    fake.chmod(0o755)
    import datetime

    expected = datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp()
    assert slurm_end_time({"SLURM_JOB_ID": "7", "PATH": str(tmp_path)}) == expected
    assert slurm_end_time({"SLURM_JOB_ID": "7", "PATH": "/nonexistent"}) is None


# -- torch.distributed: one rank's signal stops every rank at the same step -----------------------------

def test_sigterm_to_one_of_two_gloo_ranks_stops_both_at_the_same_step(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "run"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(start(run, 10_000, "--distributed", "--sleep", "0.02", env=env))
    try:
        for proc in procs:
            wait_for_line(proc, "STEP 10")
        procs[1].send_signal(signal.SIGTERM)
        results = [finish(proc, timeout=90) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [code for code, _, _ in results] == [unbroken.EXIT_PREEMPTED] * 2, [err for _, _, err in results]
    steps = [stopped_step(err) for _, _, err in results]
    assert steps[0] == steps[1]
    assert "another rank is stopping" in results[0][2] and "received SIGTERM" in results[1][2]
    assert unbroken.list_checkpoints(run, verify=True)[-1].step == steps[0]  # one checkpoint, both ranks


def test_handlers_of_managers_dropped_without_close_never_kill_the_process(tmp_path: Path) -> None:
    # Managers that were never closed leave their handlers in the chain under newer ones; a signal
    # that a live manager took must never reach the default action (death) through them.  In a
    # subprocess: the bug this guards against killed the test process itself.
    script = tmp_path / "stale.py"
    script.write_text(textwrap.dedent(f"""
        import gc, os, signal, torch, unbroken
        for n in range(3):
            unbroken.CheckpointManager({str(tmp_path)!r} + f"/old{{n}}", {{"w": torch.ones(2)}})
        gc.collect()
        ckpt = unbroken.CheckpointManager({str(tmp_path / "run")!r}, {{"w": torch.ones(2)}}, on_stop="raise",
                                          async_save=False)
        os.kill(os.getpid(), signal.SIGUSR1)
        try:
            ckpt.step(1)
        except unbroken.Preempted:
            print("stopped and alive", flush=True)
        unbroken.CheckpointManager({str(tmp_path / "other")!r}, {{"w": torch.ones(2)}}).close()
        os.kill(os.getpid(), signal.SIGUSR1)  # no manager left: the default action again
        print("not reached", flush=True)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "stopped and alive" in done.stdout, done.stderr
    assert "not reached" not in done.stdout and done.returncode == -signal.SIGUSR1
