"""``unbroken run``: run a training command, restart it after a crash, give up when it stops progressing.

The child's exit status decides what happens next:

* ``0``: the run is done; the supervisor exits 0.
* ``75`` (:data:`EXIT_PREEMPTED`, ``EX_TEMPFAIL``): the manager saved after a pre-emption or deadline
  signal; the supervisor does not restart it and exits 75 so that the scheduler requeues the job.
* anything else, a death by signal counting as ``128 + signum``: a crash.  The child is restarted
  after a backoff, unless the supervisor was told to stop (SIGTERM, SIGINT, SIGHUP) or the run made
  no progress ``max_restarts`` restarts in a row; then the supervisor exits with the child's status.

Progress means a newer valid checkpoint in the run directory than before the attempt.

Signals.  The child runs in its own session (``start_new_session=True``) and the supervisor forwards
SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the child's pid only, never to its process group:

* A terminal's Ctrl-C (or a SLURM step signal aimed at our group) reaches the supervisor alone, so
  the child gets each signal exactly once, from us, instead of twice.
* The child decides how its own helpers wind down.  Signalling the whole group would kill DataLoader
  workers under a training loop that is trying to save, and under ``torchrun`` it would race the
  agent's own shutdown.  ``torchrun`` starts every worker in a session of its own (so a group
  signal would not reach them anyway) and relays SIGTERM, SIGINT and SIGHUP (the signals named in
  ``TORCHELASTIC_SIGNALS_TO_HANDLE``) to them itself.  It does not relay SIGUSR1/SIGUSR2: it dies
  from them, which counts as a crash.
* When the child has exited, whatever it left running in its process group (orphaned DataLoader
  workers, a shell's background jobs) is killed with SIGKILL before anything else happens, so that
  two generations of a run never overlap.
* On Linux the child gets SIGTERM if the supervisor dies (``PR_SET_PDEATHSIG``), so a supervisor
  killed with SIGKILL does not leave an unsupervised run writing into the run directory.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ..manager.events import EventLog
from ..manager.preemption import EXIT_PREEMPTED, read_stop_marker  # the status the manager exits with after a stop save
from .stderrtail import StderrTail

__all__ = ["EXIT_PREEMPTED", "SupervisorConfig", "supervise"]


_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_RELAYED_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGUSR2})
_HANDLED = _STOP_SIGNALS | _RELAYED_SIGNALS
_POLL_S = 0.05              # how promptly a backoff sleep notices a stop signal
_PUMP_GRACE_S = 5.0         # how long stderr may still flow after the child exited (a grandchild holding it)
_PR_SET_PDEATHSIG = 1       # from <linux/prctl.h>


@dataclass(frozen=True)
class SupervisorConfig:
    """How :func:`supervise` restarts a command.

    Attributes:
        run_dir: the run directory the command checkpoints into.  Progress means a newer valid
            checkpoint there than before the attempt.  ``None``: progress is never seen, so every
            restart counts as one without progress.
        max_restarts: restarts in a row without progress before giving up (``0``: give up at the
            first crash that made no progress).  A crash after progress always restarts.
        backoff: seconds to wait before a restart that follows progress, and before the first
            restart in a row without progress.
        max_backoff: the cap of the wait, which doubles with each further restart in a row without
            progress: ``backoff * 2**(k-1)`` before the k-th (1, 2, 4, ... s for ``backoff=1``).
        tail_lines: how many of the child's last stderr lines the give-up report shows.
    """

    run_dir: str | os.PathLike[str] | None = None
    max_restarts: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    tail_lines: int = 40

    def __post_init__(self) -> None:
        _check_count("max_restarts", self.max_restarts)
        _check_count("tail_lines", self.tail_lines)
        _check_seconds("backoff", self.backoff)
        _check_seconds("max_backoff", self.max_backoff)
        if self.max_backoff < self.backoff:
            raise ValueError(f"max_backoff ({self.max_backoff} s) must not be below backoff ({self.backoff} s)")
        if self.run_dir is not None and os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise ValueError(f"run directory {os.fspath(self.run_dir)!r} exists and is not a directory")

    def delay(self, doublings: int) -> float:
        """Seconds to wait after the backoff doubled ``doublings`` times: ``backoff * 2**doublings``, capped.

        The k-th restart in a row without progress waits ``delay(k - 1)``: the first wait is ``backoff``.
        """
        # The cap on the exponent only avoids an OverflowError; max_backoff bounds the result anyway.
        return min(self.max_backoff, self.backoff * 2.0 ** min(doublings, 64))


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}")


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds, 0 or more, got {value}")


def supervise(command: Sequence[str], config: SupervisorConfig, *, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> int:
    """Run ``command`` until it succeeds, is pre-empted, is stopped by a signal or stops progressing.

    Returns the exit status to exit with: the child's last one (``128 + signum`` for a death by
    signal), ``127``/``126`` when the command cannot be started, or ``128 + signum`` when a stop
    signal arrives while no child runs.  Must run in the main thread (it installs signal handlers).
    ``clock`` (monotonic seconds) and ``sleep`` time the waits before restarts (tests pass fake ones).
    """
    command = list(command)
    if not command:
        raise ValueError("no command to run: give it after '--', e.g. unbroken run -- python train.py")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("supervise() must run in the main thread: it handles signals")
    relay = _Relay()
    # Receive our signals even if the parent blocked them: a blocked mask is inherited across exec, and
    # with it a stop signal would stay pending until the child ends (and the child, given our mask,
    # would never see it either).  An ignored signal (nohup) is a choice and stays ignored.
    with _handled_signals(signal.SIG_UNBLOCK), _handlers_installed(relay):
        try:
            return _Supervisor(command, config, relay, clock, sleep).run()
        except _StartFailed as exc:
            return exc.status


class _StartFailed(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Relay:
    """What the signal handlers share with the supervising loop.

    The handler only sets a field and calls ``os.kill``, so it is safe wherever the interpreter
    runs it.  Invariant: ``child_pid`` is set only while the child is unreaped (running or a
    zombie), so its pid cannot belong to anyone else when we signal it.
    """

    def __init__(self) -> None:
        self.child_pid: int | None = None
        self.stop_signal: int | None = None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum in _STOP_SIGNALS:
            self.stop_signal = signum
        pid = self.child_pid
        if pid is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # only where os.waitid is missing (macOS before 3.13): reaped a moment ago


@contextmanager
def _handlers_installed(relay: _Relay) -> Iterator[None]:
    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in sorted(_HANDLED):
            old: Any = signal.getsignal(sig)
            if old is signal.SIG_IGN:
                continue  # e.g. under nohup: respect it; the child inherits the ignored disposition too
            previous[sig] = signal.SIG_DFL if old is None else old
            signal.signal(sig, relay.handle)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _handled_signals(how: int) -> Iterator[set[int]]:
    """Our signals blocked (``SIG_BLOCK``) or unblocked (``SIG_UNBLOCK``) inside the block; yields the
    mask as it was before, which is restored on the way out."""
    old = signal.pthread_sigmask(how, _HANDLED)
    try:
        yield old
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None  # no prctl to be had: the child then simply outlives a killed supervisor


def _child_setup(mask: set[int], parent: int, prctl: Callable[..., int] | None) -> Callable[[], None]:
    """Runs in the child between fork and exec: no locks, no imports, no output."""

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # exec keeps the mask: give the child ours
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:
                os._exit(128 + signal.SIGTERM)  # the supervisor died before prctl took effect

    return setup


class _Supervisor:
    def __init__(self, command: list[str], config: SupervisorConfig, relay: _Relay,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.command = command
        self.clock, self.sleep = clock, sleep
        self.config = config
        self.relay = relay
        self.prctl = _load_prctl()
        self.restarts = 0
        self.no_progress = 0  # restarts in a row without progress
        self.newest = _newest_step(config.run_dir)  # the newest valid checkpoint seen so far
        self.tail: list[str] = []
        self.events: EventLog | None = None  # the run's event log, opened at the first abnormal exit
        self.pid: int | None = None  # the last child's

    def run(self) -> int:
        while True:
            started = time.time()
            returncode = self._attempt()
            status = self._preempted_behind_torchrun(_status(returncode), started)
            if status in (0, EXIT_PREEMPTED) or self.relay.stop_signal is not None:
                self._crashed(returncode, status, None)
                self._say_final(returncode, status)
                return status
            delay = self._restart_delay(returncode)
            self._crashed(returncode, status, delay)
            if delay is None:
                return status
            stop = self._sleep(delay)
            if stop is not None:
                _say(f"stopped by {_signal_name(stop)} while waiting to restart")
                return 128 + stop
            self.restarts += 1

    def _crashed(self, returncode: int, status: int, backoff: float | None) -> None:
        """A ``crash`` event in the run's log for an attempt that did not exit 0 (``backoff``: the wait
        before its restart, None when it is not restarted)."""
        if status == 0 or self.config.run_dir is None:
            return
        if self.events is None:
            self.events = EventLog.for_run(self.config.run_dir)
        self.events.emit("crash", exit_status=returncode, restart=self.restarts, backoff_s=backoff,
                         preempted=status == EXIT_PREEMPTED, pid=self.pid)
        self.events.flush()

    def _preempted_behind_torchrun(self, status: int, started: float) -> int:
        """75 when the child's manager recorded a stop save during this attempt but the status was
        lost on the way (``torchrun`` reports a worker's 75 as 1)."""
        if status in (0, EXIT_PREEMPTED) or self.config.run_dir is None:
            return status
        record = read_stop_marker(os.fspath(self.config.run_dir), since=started)
        if record is None:
            return status
        _say(f"child exited with status {status}, but its manager stopped at step {record.get('step')} "
             f"({record.get('reason')}) with the state saved: treating it as pre-empted")
        return EXIT_PREEMPTED

    def _attempt(self) -> int:
        """Run the child once; its raw return code (negative: killed by that signal)."""
        read_fd, write_fd = os.pipe()
        try:
            proc = self._start(write_fd)
        except OSError as exc:
            os.close(read_fd)
            _say(f"cannot run {self.command[0]!r}: {exc.strerror or exc}")
            raise _StartFailed(127 if isinstance(exc, FileNotFoundError) else 126) from exc
        finally:
            os.close(write_fd)
        # The pump thread starts with our signals blocked (a thread inherits the mask), so the kernel
        # delivers them to the main thread: one delivered to the pump would leave the main thread's
        # waitid uninterrupted, and the handler (the forwarding) would wait until the child exits.
        with _handled_signals(signal.SIG_BLOCK):
            tail = StderrTail(read_fd, self.config.tail_lines)
        returncode = self._wait(proc)
        tail.join(_PUMP_GRACE_S)
        self.tail = tail.lines()
        return returncode

    def _start(self, stderr_fd: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, UNBROKEN_RESTART=str(self.restarts))
        # Held back while the child is being started: a handler then always sees its pid.
        with _handled_signals(signal.SIG_BLOCK) as mask:
            proc = subprocess.Popen(self.command, env=env, stderr=stderr_fd, start_new_session=True,
                                    preexec_fn=_child_setup(mask, os.getpid(), self.prctl))
            self.relay.child_pid = self.pid = proc.pid
        return proc

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        if hasattr(os, "waitid"):
            # Wait without reaping: until the child is reaped its pid, which is also its process
            # group's id, cannot be reused, so neither the handler nor killpg can hit a stranger.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            self.relay.child_pid = None
            _kill_leftovers(proc.pid)
        returncode = proc.wait()
        self.relay.child_pid = None
        return returncode

    def _restart_delay(self, returncode: int) -> float | None:
        """Account for a crash; the seconds to wait before restarting, or None to give up."""
        step = _newest_step(self.config.run_dir)
        progressed = step is not None and (self.newest is None or step > self.newest)
        if progressed:
            self.newest = step
            self.no_progress = 0
            note = "made progress"
        elif self.no_progress >= self.config.max_restarts:
            self._report(returncode)
            return None
        else:
            self.no_progress += 1
            note = f"no progress: {self.no_progress}/{self.config.max_restarts}"
        delay = self.config.delay(max(0, self.no_progress - 1))
        _say(f"child {_describe(returncode)}{self._at_step()} ({note}); restarting in {round(delay, 3)} s")
        return delay

    def _sleep(self, seconds: float) -> int | None:
        """Sleep unless a stop signal arrives; that signal, or None."""
        deadline = self.clock() + seconds
        while self.relay.stop_signal is None:
            left = deadline - self.clock()
            if left <= 0:
                return None
            self.sleep(min(_POLL_S, left))
        return self.relay.stop_signal

    def _at_step(self) -> str:
        if self.config.run_dir is None:
            return ""
        return f" at step {self.newest}" if self.newest is not None else " with no checkpoint yet"

    def _say_final(self, returncode: int, status: int) -> None:
        if self.relay.stop_signal is not None:
            name = _signal_name(self.relay.stop_signal)
            _say(f"stopped by {name}; the child {_describe(returncode)}; not restarting")
        elif status == EXIT_PREEMPTED:
            _say(f"child exited with status {EXIT_PREEMPTED} (pre-empted, state saved); not restarting: "
                 "requeue the job to resume")
        elif self.restarts:
            _say(f"child finished after {self.restarts} restart(s)")

    def _report(self, returncode: int) -> None:
        run_dir = self.config.run_dir
        if run_dir is None:
            step = "unknown (no --dir given)"
        elif self.newest is None:
            step = f"none (no valid checkpoint in {os.fspath(run_dir)})"
        else:
            step = f"{self.newest} (newest valid checkpoint in {os.fspath(run_dir)})"
        killed = f" (killed by {_signal_name(-returncode)})" if returncode < 0 else ""
        lines = [f"giving up: {self.no_progress + 1} attempt(s) in a row made no progress "
                 f"(max-restarts {self.config.max_restarts}); {self.restarts} restart(s) in all",
                 f"  last step reached: {step}",
                 f"  last exit status: {_status(returncode)}{killed}"]
        if self.tail:
            lines.append(f"  last {len(self.tail)} line(s) of the child's stderr:")
            lines += [f"    | {line}" for line in self.tail]
        else:
            lines.append("  the child wrote nothing to stderr")
        _say("\n".join(lines))


def _kill_leftovers(pgid: int) -> None:
    """SIGKILL what the exited child left in its process group, so two generations never overlap."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left (the unreaped leader normally keeps the group alive, so this is rare)
    except PermissionError:
        pass  # a leftover that changed its user id is not ours to kill


def _newest_step(run_dir: str | os.PathLike[str] | None) -> int | None:
    if run_dir is None:
        return None
    from ..checkpoint.inspection import list_checkpoints  # only with --dir: `unbroken run --help` skips it

    try:
        records = list_checkpoints(run_dir)
    except FileNotFoundError:
        return None  # the run has not created its directory yet
    except OSError as exc:
        _say(f"warning: cannot list {os.fspath(run_dir)}: {exc}; counting this as no progress")
        return None
    return max((r.step for r in records if r.valid), default=None)


def _status(returncode: int) -> int:
    """A shell's view of a return code: a death by signal N is 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def _describe(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    return f"was killed by {_signal_name(-returncode)} (status {_status(returncode)})"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say(message: str) -> None:
    print(f"unbroken run: {message}", file=sys.stderr, flush=True)
