"""``unbroken run``: the supervisor, with real processes (the CLI as a subprocess, real children)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import FakeClock, wait_until
from unbroken.cli.supervisor import EXIT_PREEMPTED, SupervisorConfig, supervise
from unbroken.manager.event_log_format import read_events

TESTS = Path(__file__).resolve().parents[1]
TRAIN = TESTS / "supervised_train.py"
DDP = TESTS / "supervised_ddp.py"
FAST = ("--backoff", "0.05", "--max-backoff", "1")


def supervisor_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "unbroken.cli", "run", *map(str, args)]


def supervise_cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(supervisor_command(*args), capture_output=True, text=True, timeout=timeout)


def script(tmp_path: Path, body: str) -> Path:
    """A child script; ``OUT`` in it is ``tmp_path`` and ``ATTEMPT`` the supervisor's restart count."""
    path = tmp_path / "child.py"
    header = (f"import os, signal, sys, time\nfrom pathlib import Path\nOUT = Path({str(tmp_path)!r})\n"
              "ATTEMPT = int(os.environ['UNBROKEN_RESTART'])\n"
              "with open(OUT / 'attempts', 'a') as f:\n    f.write(f'{ATTEMPT}\\n')\n")
    path.write_text(header + textwrap.dedent(body))
    return path


def attempts(tmp_path: Path) -> list[int]:
    return [int(v) for v in (tmp_path / "attempts").read_text().split()]


def train(tmp_path: Path, name: str, *extra: object) -> list[str]:
    """The command line of the training script writing into ``tmp_path/name``."""
    (tmp_path / f"{name}_markers").mkdir()
    return [sys.executable, str(TRAIN), str(tmp_path / name), str(tmp_path / f"{name}.pt"),
            "--markers", str(tmp_path / f"{name}_markers"), "--log", str(tmp_path / f"{name}.log"), *map(str, extra)]


def assert_same_training(a: Path, b: Path) -> None:
    left, right = torch.load(a), torch.load(b)
    assert left["model"].keys() == right["model"].keys()
    for key in left["model"]:
        assert torch.equal(left["model"][key], right["model"][key]), key
    for i, state in left["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], right["optimizer"]["state"][i]["momentum_buffer"])


def restart_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("unbroken run: child") and "restarting" in line]


# -- crashes, progress and giving up -------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_three_crashes_resume_bit_exact(tmp_path: Path) -> None:
    reference = subprocess.run(train(tmp_path, "ref"), capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr
    out = supervise_cli("--dir", tmp_path / "run", *FAST, "--",
                        *train(tmp_path, "run", "--crash-at", "7,13,22"))
    assert out.returncode == 0, out.stderr
    assert_same_training(tmp_path / "ref.pt", tmp_path / "run.pt")
    # Each attempt logs "<UNBROKEN_RESTART> <start step>": resumed from the checkpoint before each crash.
    assert (tmp_path / "run.log").read_text().split("\n")[:-1] == ["0 0", "1 5", "2 10", "3 20"]
    lines = restart_lines(out.stderr)
    assert len(lines) == 3, out.stderr
    assert lines[0] == "unbroken run: child exited with status 1 at step 5 (made progress); restarting in 0.05 s"
    assert "crashing at step 22 (restart 2)" in out.stderr  # the child's stderr passes through
    assert "child finished after 3 restart(s)" in out.stderr


@pytest.mark.timeout(240)
def test_progress_resets_the_no_progress_count(tmp_path: Path) -> None:
    """Crashes every 7 steps, each after a new checkpoint: restarts go on well past --max-restarts 0."""
    out = supervise_cli("--dir", tmp_path / "run", "--max-restarts", "0", *FAST, "--",
                        *train(tmp_path, "run", "--crash-at", "7,14,21,28"))
    assert out.returncode == 0, out.stderr
    lines = restart_lines(out.stderr)
    assert [line.split(" at step ")[1] for line in lines] == [
        f"{step} (made progress); restarting in 0.05 s" for step in (5, 10, 20, 25)]
    assert (tmp_path / "run.log").read_text().split() == ["0", "0", "1", "5", "2", "10", "3", "20", "4", "25"]


@pytest.mark.timeout(240)
def test_gives_up_without_progress_with_a_report(tmp_path: Path) -> None:
    out = supervise_cli("--dir", tmp_path / "run", "--max-restarts", "2", *FAST, "--",
                        *train(tmp_path, "run", "--crash-at", "12", "--crash-always"))
    assert out.returncode == 1, out.stderr
    # The first crash made progress (checkpoints 5 and 10); the first restart without progress waits the
    # backoff too, and each further one in a row doubles it.
    assert [line.split(" at step 10 ")[1] for line in restart_lines(out.stderr)] == [
        "(made progress); restarting in 0.05 s",
        "(no progress: 1/2); restarting in 0.05 s",
        "(no progress: 2/2); restarting in 0.1 s"]
    report = out.stderr[out.stderr.index("unbroken run: giving up"):]
    assert "3 attempt(s) in a row made no progress (max-restarts 2); 3 restart(s) in all" in report
    assert f"last step reached: 10 (newest valid checkpoint in {tmp_path / 'run'})" in report
    assert "last exit status: 1\n" in report
    assert "    | crashing at step 12 (restart 3)" in report
    assert (tmp_path / "run.log").read_text().split() == ["0", "0", "1", "10", "2", "10", "3", "10"]


def test_without_dir_every_restart_is_without_progress(tmp_path: Path) -> None:
    child = script(tmp_path, """
        for i in range(100):
            print(f"line {i} of attempt {ATTEMPT}", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = supervise_cli("--max-restarts", "1", *FAST, "--", sys.executable, child)
    assert out.returncode == 128 + signal.SIGKILL
    assert attempts(tmp_path) == [0, 1]
    assert restart_lines(out.stderr) == [
        "unbroken run: child was killed by SIGKILL (status 137) (no progress: 1/1); restarting in 0.05 s"]
    report = out.stderr[out.stderr.index("unbroken run: giving up"):]
    assert "last step reached: unknown (no --dir given)" in report
    assert "last exit status: 137 (killed by SIGKILL)" in report
    # The report holds the last 40 lines of the last attempt, and only those.
    assert "last 40 line(s) of the child's stderr:" in report
    assert "    | line 60 of attempt 1\n" in report and "    | line 99 of attempt 1\n" in report
    assert "line 59 of attempt 1" not in report and "attempt 0" not in report
    assert "line 0 of attempt 0" in out.stderr  # but everything passed through


def test_exit_preempted_is_not_restarted(tmp_path: Path) -> None:
    child = script(tmp_path, f"sys.exit({EXIT_PREEMPTED})\n")
    out = supervise_cli("--dir", tmp_path / "run", *FAST, "--", sys.executable, child)
    assert out.returncode == EXIT_PREEMPTED == 75
    assert attempts(tmp_path) == [0]
    assert "not restarting" in out.stderr


def test_a_stop_save_whose_exit_status_was_lost_is_still_not_restarted(tmp_path: Path) -> None:
    # torchrun reports a worker's 75 as 1; the manager's stop marker in the run directory tells.
    run = tmp_path / "run"
    child = script(tmp_path, f"""
        import torch, unbroken
        # No time left from the start: the manager stops at the first step boundary, with a stop save.
        ckpt = unbroken.CheckpointManager({str(run)!r}, {{"w": torch.ones(2)}}, max_runtime=0,
                                          deadline_margin=0.1, async_save=False)
        try:
            for step in range(1, 10_000):
                ckpt.step(step)
        except SystemExit as stop:
            assert stop.code == 75
            sys.exit(1)  # what torchrun would report
        """)
    out = supervise_cli("--dir", run, *FAST, "--", sys.executable, child)
    assert out.returncode == EXIT_PREEMPTED, out.stderr
    assert attempts(tmp_path) == [0]
    assert "treating it as pre-empted" in out.stderr


def test_a_stale_stop_marker_does_not_hide_a_crash(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".stopped").write_text('{"step": 3, "reason": "old", "time": 1.0}')
    child = script(tmp_path, "sys.exit(1)\n")
    out = supervise_cli("--dir", run, "--max-restarts", "0", *FAST, "--", sys.executable, child)
    assert out.returncode == 1
    assert "treating it as pre-empted" not in out.stderr


def test_success_passes_stdout_through(tmp_path: Path) -> None:
    child = script(tmp_path, "print('hello from the child')\n")
    out = supervise_cli(*FAST, "--", sys.executable, child)
    assert out.returncode == 0 and out.stdout == "hello from the child\n"
    assert out.stderr == ""


def test_command_that_cannot_start(tmp_path: Path) -> None:
    out = supervise_cli("--", tmp_path / "no-such-program")
    assert out.returncode == 127
    assert "cannot run" in out.stderr and "No such file or directory" in out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_leftovers_of_a_crashed_child_are_killed(tmp_path: Path) -> None:
    """A process the child left running in its group does not survive into the next attempt."""
    child = script(tmp_path, """
        if ATTEMPT == 0:
            import subprocess
            leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            (OUT / "leftover").write_text(str(leftover.pid))
            os._exit(1)
        try:
            state = Path(f"/proc/{(OUT / 'leftover').read_text()}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            state = "gone"
        (OUT / "leftover_state").write_text(state)
    """)
    out = supervise_cli(*FAST, "--", sys.executable, child)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "leftover_state").read_text() in ("gone", "Z")  # dead (a zombie until init reaps it)


# -- signals ------------------------------------------------------------------------------------------

def _default_stop_signals() -> None:
    # A test runner may run us with SIGINT/SIGHUP ignored (pytest-xdist workers do); an ignored signal
    # is inherited and stays ignored by design, which is not what these tests are about.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _stop_signals_blocked() -> None:
    # A parent that blocks signals: the mask is inherited across exec.  Without unblocking, SIGTERM
    # would stay pending in the supervisor (and in the child, which gets the supervisor's mask) until
    # the child ended on its own.
    _default_stop_signals()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def start_supervisor(*args: object, parent: Callable[[], None] = _default_stop_signals) -> subprocess.Popen[str]:
    return subprocess.Popen(supervisor_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=parent)  # noqa: PLW1509 - no threads start children here


@pytest.mark.parametrize("parent", [_default_stop_signals, _stop_signals_blocked], ids=["default", "blocked"])
def test_sigterm_is_forwarded_and_stops_supervision(tmp_path: Path, parent: Callable[[], None]) -> None:
    child = script(tmp_path, """
        def on_term(signum, frame):
            (OUT / "got_term").write_text(str(signum))
            sys.exit(42)
        signal.signal(signal.SIGTERM, on_term)
        (OUT / "ready").touch()
        time.sleep(60)
    """)
    sup = start_supervisor(*FAST, "--", sys.executable, child, parent=parent)
    wait_until((tmp_path / "ready").exists)
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 42, err
    assert (tmp_path / "got_term").read_text() == str(int(signal.SIGTERM))
    assert attempts(tmp_path) == [0]
    assert "stopped by SIGTERM; the child exited with status 42; not restarting" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_other_stop_signals_reach_an_untrapping_child(tmp_path: Path, sig: signal.Signals) -> None:
    child = script(tmp_path, """
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # die from SIGINT like from SIGHUP, not with a traceback
        (OUT / "ready").touch()
        time.sleep(60)
    """)
    sup = start_supervisor(*FAST, "--", sys.executable, child)
    wait_until((tmp_path / "ready").exists)
    sup.send_signal(sig)
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 128 + sig, err
    assert attempts(tmp_path) == [0]


def test_sigusr1_is_forwarded_without_stopping_supervision(tmp_path: Path) -> None:
    child = script(tmp_path, """
        def on_usr1(signum, frame):
            (OUT / f"usr1_{ATTEMPT}").touch()
            os._exit(3 if ATTEMPT == 0 else 0)
        signal.signal(signal.SIGUSR1, on_usr1)
        (OUT / f"ready_{ATTEMPT}").touch()
        time.sleep(60)
    """)
    sup = start_supervisor(*FAST, "--", sys.executable, child)
    wait_until((tmp_path / "ready_0").exists)
    sup.send_signal(signal.SIGUSR1)  # the child exits 3: a crash, restarted
    wait_until((tmp_path / "ready_1").exists)
    sup.send_signal(signal.SIGUSR1)  # the child exits 0: done
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    assert (tmp_path / "usr1_0").exists() and (tmp_path / "usr1_1").exists()
    assert attempts(tmp_path) == [0, 1]


def test_sigterm_during_the_backoff_stops_without_restart(tmp_path: Path) -> None:
    child = script(tmp_path, "sys.exit(1)\n")
    sup = start_supervisor("--backoff", "30", "--", sys.executable, child)
    assert sup.stderr is not None
    said = ""
    while "restarting in" not in said:  # the child has exited and the supervisor is waiting 30 s
        line = sup.stderr.readline()
        assert line, f"the supervisor exited before its backoff: {said}"
        said += line
    started = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=20)
    err = said + err
    assert sup.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - started < 10
    assert attempts(tmp_path) == [0]
    assert "stopped by SIGTERM while waiting to restart" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_child_gets_sigterm_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    child = script(tmp_path, """
        def on_term(signum, frame):
            (OUT / "got_term").touch()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        (OUT / "ready").touch()
        time.sleep(60)
    """)
    sup = start_supervisor(*FAST, "--", sys.executable, child)
    wait_until((tmp_path / "ready").exists)
    sup.kill()
    sup.communicate(timeout=20)
    wait_until((tmp_path / "got_term").exists, timeout=20)


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (("--max-restarts", "-1", "--", "true"), "max_restarts must be 0 or more, got -1"),
    (("--backoff", "-0.5", "--", "true"), "backoff must be a finite number of seconds, 0 or more, got -0.5"),
    (("--backoff", "nan", "--", "true"), "backoff must be a finite number of seconds"),
    (("--backoff", "5", "--max-backoff", "1", "--", "true"), "max_backoff (1.0 s) must not be below backoff (5.0 s)"),
    (("--dir", "x", "--"), "no command to run"),
    (("--max-restarts", "2"), "no command to run"),
])
def test_bad_options_exit_2_with_a_clear_message(args: tuple[str, ...], message: str) -> None:
    out = supervise_cli(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("unbroken run: error: ") and message in out.stderr


def test_run_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    out = supervise_cli("--dir", tmp_path / "file", "--", "true")
    assert out.returncode == 2 and "exists and is not a directory" in out.stderr


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_restarts": -1}, "max_restarts must be 0 or more"),
    ({"max_restarts": 1.5}, "max_restarts must be a whole number"),
    ({"max_restarts": True}, "max_restarts must be a whole number"),
    ({"backoff": float("inf")}, "backoff must be a finite number"),
    ({"max_backoff": "60"}, "max_backoff must be a number of seconds"),
    ({"tail_lines": -3}, "tail_lines must be 0 or more"),
])
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SupervisorConfig(**kwargs)  # type: ignore[arg-type]


def test_supervise_refuses_an_empty_command() -> None:
    with pytest.raises(ValueError, match="no command to run"):
        supervise([], SupervisorConfig())


def test_backoff_doubles_and_is_capped() -> None:
    config = SupervisorConfig(backoff=1, max_backoff=10)
    assert [config.delay(k) for k in range(6)] == [1, 2, 4, 8, 10, 10]
    assert SupervisorConfig().delay(10_000) == 60


# -- torchrun ---------------------------------------------------------------------------------------

def torchrun(*args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(DDP),
            *map(str, args)]


@pytest.mark.timeout(300)
def test_torchrun_child_is_restarted_after_a_rank_crash(tmp_path: Path) -> None:
    out = supervise_cli(*FAST, "--", *torchrun(tmp_path, "crash-once"), timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "done").read_text() == "8.0 2 1"  # 2 ranks, 3 all-reduces, on the second attempt
    assert "rank 0 crashing on the first attempt" in out.stderr
    assert len(restart_lines(out.stderr)) == 1


@pytest.mark.timeout(300)
def test_sigterm_reaches_torchrun_workers(tmp_path: Path) -> None:
    """torchrun relays SIGTERM to its workers; it then exits 1 whatever they did, and is not restarted."""
    sup = start_supervisor(*FAST, "--", *torchrun(tmp_path, "wait-for-term"))
    try:
        wait_until(lambda: (tmp_path / "ready_0").exists() and (tmp_path / "ready_1").exists(), timeout=180)
        sup.send_signal(signal.SIGTERM)
        _, err = sup.communicate(timeout=90)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.communicate()
    assert (tmp_path / "term_0").exists() and (tmp_path / "term_1").exists()
    assert sup.returncode == 1, err[-4000:]
    assert "stopped by SIGTERM; the child exited with status 1; not restarting" in err
    assert len(restart_lines(err)) == 0


def test_the_restart_backoff_doubles_up_to_its_cap_without_waiting(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    child = script(tmp_path, "sys.exit(3)\n")
    clock = FakeClock()
    config = SupervisorConfig(max_restarts=3, backoff=30, max_backoff=100)
    start = clock()
    assert supervise([sys.executable, str(child)], config, clock=clock, sleep=clock.sleep) == 3
    assert attempts(tmp_path) == [0, 1, 2, 3]
    assert clock() - start == pytest.approx(30 + 60 + 100)  # 30, 30 * 2, then capped at 100
    assert max(clock.sleeps) <= 0.05  # short naps: a stop signal is noticed at once
    err = capsys.readouterr().err
    said = [float(line.split("restarting in ")[1].split()[0]) for line in err.splitlines() if "restarting in" in line]
    assert said == [30, 60, 100]


def test_the_first_restart_waits_the_backoff_and_says_so(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`unbroken run -- /bin/false` with the default --backoff 1: waits 1, 2, 4 s, and says those numbers."""
    child = script(tmp_path, "sys.exit(1)\n")
    clock = FakeClock()
    start = clock()
    assert supervise([sys.executable, str(child)], SupervisorConfig(), clock=clock, sleep=clock.sleep) == 1
    assert clock() - start == pytest.approx(1 + 2 + 4)
    said = [line.split("; ")[-1] for line in capsys.readouterr().err.splitlines() if "restarting in" in line]
    assert said == ["restarting in 1.0 s", "restarting in 2.0 s", "restarting in 4.0 s"]


def crash_events(run: Path) -> list[tuple[object, ...]]:
    return [(e["exit_status"], e["restart"], e["backoff_s"], e["preempted"]) for e in read_events(run)
            if e["event"] == "crash"]


def test_each_abnormal_exit_is_a_crash_event_in_the_run_log(tmp_path: Path) -> None:
    """exit status (negative: the signal), the attempt's restart number, the backoff before the next one
    (None: given up), for `unbroken report`'s timeline."""
    child = script(tmp_path, "sys.exit(3) if ATTEMPT < 2 else os.kill(os.getpid(), signal.SIGKILL)\n")
    clock = FakeClock()
    config = SupervisorConfig(run_dir=tmp_path / "run", max_restarts=2, backoff=30, max_backoff=100)
    assert supervise([sys.executable, str(child)], config, clock=clock, sleep=clock.sleep) == 128 + 9
    assert crash_events(tmp_path / "run") == [(3, 0, 30, False), (3, 1, 60, False), (-9, 2, None, False)]


def test_a_preemption_is_a_crash_event_marked_preempted_and_success_writes_none(tmp_path: Path) -> None:
    config = SupervisorConfig(run_dir=tmp_path / "run")
    child = script(tmp_path, f"sys.exit({EXIT_PREEMPTED})\n")
    assert supervise([sys.executable, str(child)], config) == EXIT_PREEMPTED
    child = script(tmp_path, "sys.exit(0)\n")
    assert supervise([sys.executable, str(child)], config) == 0
    assert crash_events(tmp_path / "run") == [(EXIT_PREEMPTED, 0, None, True)]
