"""Stop requests: pre-emption signals and wall-clock deadlines, decided at a step boundary.

A signal handler runs between two bytecodes of whatever the training loop is doing (inside a
backward pass, inside a save), so it only records the request.  The manager's next ``step()`` acts
on it: the state is then consistent (a whole number of steps), and the save is an ordinary one.
A second signal while that save runs only records again; nothing is interrupted.

Deadlines are checked at the same place.  The manager stops early enough that one more step and
one more save would still fit: ``remaining < longest recent step + longest recent save + margin``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from types import FrameType
from typing import Any, Union

from ..errors import UnbrokenError

__all__ = ["EXIT_PREEMPTED", "STOP_MARKER", "Preempted", "Stops", "StopWatch", "StopAgreement", "parse_signals",
           "slurm_end_time", "absolute_deadline", "earliest_limit", "write_stop_marker", "read_stop_marker"]

log = logging.getLogger("unbroken")

#: The exit status after a save forced by a signal or a deadline (``EX_TEMPFAIL``: "try again later").
EXIT_PREEMPTED = 75

#: Written into a local run directory after a stop save.  ``torchrun`` turns a worker's exit status 75
#: into 1, so ``unbroken run`` reads this file to tell a pre-emption from a crash.
STOP_MARKER = ".stopped"

_Handler = Union[Callable[[int, FrameType | None], Any], int, None]  # noqa: UP007 (a runtime alias)


class Preempted(UnbrokenError, RuntimeError):
    """Raised by ``step()`` (with ``on_stop="raise"``) once the stop checkpoint is committed."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"stopped at step {step} ({reason}); its checkpoint is committed. Run the same command "
                         "again to resume")
        self.step, self.reason = step, reason


def write_stop_marker(run_dir: str, step: int, reason: str) -> None:
    record = json.dumps({"step": step, "reason": reason, "pid": os.getpid(), "time": time.time()}).encode()
    tmp = os.path.join(run_dir, f"{STOP_MARKER}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(record)
        os.replace(tmp, os.path.join(run_dir, STOP_MARKER))  # whole or absent, with several ranks writing
    except OSError as exc:  # the checkpoint is what matters; the marker only helps the supervisor
        log.warning("could not write the stop marker in %s: %s", run_dir, exc)


def read_stop_marker(run_dir: str, since: float) -> dict[str, Any] | None:
    """The stop record written at or after ``since`` (UNIX time), or None."""
    try:
        with open(os.path.join(run_dir, STOP_MARKER), "rb") as handle:
            record = json.loads(handle.read(4096))
        return record if isinstance(record, dict) and float(record.get("time", 0)) >= since else None
    except (OSError, ValueError, TypeError):
        return None


def parse_signals(names: Sequence[str | int] | None) -> tuple[signal.Signals, ...]:
    """``["SIGTERM", "USR1", 10]`` -> signals; a ValueError naming a bad entry and the accepted forms."""
    result = []
    for name in names or ():
        try:
            if isinstance(name, int) and not isinstance(name, bool):
                result.append(signal.Signals(name))
            elif isinstance(name, str):
                upper = name.upper()
                result.append(signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper])
            else:
                raise KeyError(name)
        except (KeyError, ValueError):
            raise ValueError(f"stop_signals: {name!r} is not a signal; use names like 'SIGTERM', 'SIGUSR1' "
                             "or numbers") from None
    if any(s in (signal.SIGKILL, signal.SIGSTOP) for s in result):
        raise ValueError("stop_signals: SIGKILL and SIGSTOP cannot be caught; a SIGKILL is survived by the "
                         "crash-safe commit, not by a handler")
    return tuple(dict.fromkeys(result))


def slurm_end_time(environ: dict[str, str] | None = None) -> float | None:
    """The SLURM job's end time (UNIX seconds), if this process runs in a job with a time limit.

    ``SLURM_JOB_END_TIME`` (set by recent Slurm versions) first; else ``squeue -h -j $SLURM_JOB_ID -o %e``.
    """
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return None
    end = env.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and int(end) > 0:
        return float(end)
    squeue = shutil.which("squeue", path=env.get("PATH"))
    if squeue is None:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-j", env["SLURM_JOB_ID"], "-o", "%e"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        return datetime.fromisoformat(out.splitlines()[0]).timestamp() if out else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not read the SLURM job's end time (%s); no deadline from SLURM", exc)
        return None


class StopWatch:
    """Collects stop requests (signals, a deadline) and says at a step boundary whether to stop."""

    def __init__(self, signals: Sequence[signal.Signals], deadline: float | None, margin: float,
                 clock: Callable[[], float] = time.time, timer: Callable[[], float] = time.monotonic) -> None:
        """``clock``: UNIX time, the scale of ``deadline``; ``timer``: monotonic seconds that time the
        steps.  Tests pass fake ones to step through a deadline without waiting for it."""
        self.signals, self.deadline, self.margin = tuple(signals), deadline, margin
        self._clock, self._timer = clock, timer
        self.requested: signal.Signals | None = None
        self._active = True
        self._previous: dict[signal.Signals, _Handler] = {}
        self._steps: deque[float] = deque(maxlen=20)
        self._saves: deque[float] = deque(maxlen=5)
        self._last_step: float | None = None

    def install(self) -> None:
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("CheckpointManager created off the main thread: stop signals %s are not handled "
                        "(Python only allows handlers on the main thread)", [s.name for s in self.signals])
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back.  Where another handler was installed on top of ours (it
        chains to ours), ours stays in the chain but only passes signals through from now on."""
        self._active = False
        for sig, previous in list(self._previous.items()):
            if signal.getsignal(sig) == self._handle:
                # Skip the handlers of other closed managers below ours: the chain shrinks back.
                previous = _live_below(previous, sig)
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
                del self._previous[sig]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only records: the save happens at the next step boundary, outside the handler.
        self._deliver(signal.Signals(signum), frame, taken=False)

    def _deliver(self, sig: signal.Signals, frame: FrameType | None, taken: bool) -> None:
        """Record (if open) and pass ``sig`` down the chain of handlers installed before ours.

        ``taken``: a live handler above already acted on it.  Only when nobody did (every unbroken
        handler on the way is closed and the chain ends in SIG_DFL) is the default action carried
        out, exactly as if no handler of ours had ever been installed."""
        if self._active and self.requested is None:
            self.requested = sig
        taken = taken or self._active
        previous = self._previous.get(sig)
        below = getattr(previous, "__self__", None)
        if isinstance(below, StopWatch):
            below._deliver(sig, frame, taken)
        elif callable(previous):
            previous(int(sig), frame)
        elif not taken and previous in (signal.SIG_DFL, None):
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), int(sig))

    def step_done(self) -> None:
        now = self._timer()
        if self._last_step is not None:
            self._steps.append(now - self._last_step)
        self._last_step = now

    def save_took(self, seconds: float) -> None:
        self._saves.append(seconds)

    def reason(self) -> str | None:
        """Why to stop now, or None."""
        if self.requested is not None:
            return f"received {self.requested.name}"
        if self.deadline is None:
            return None
        remaining = self.deadline - self._clock()
        needed = max(self._steps, default=0.0) + max(self._saves, default=0.0) + self.margin
        if remaining < needed:
            return f"deadline in {max(remaining, 0):.0f} s, and a step plus a save take up to {needed:.0f} s"
        return None


def _live_below(handler: _Handler, sig: signal.Signals) -> _Handler:
    """``handler``, or the first handler under it that is not a closed manager's."""
    watch = getattr(handler, "__self__", None)
    while isinstance(watch, StopWatch) and not watch._active:
        handler = watch._previous.get(sig, signal.SIG_DFL)
        watch = getattr(handler, "__self__", None)
    return handler


def absolute_deadline(max_runtime: float | None, deadline: float | None, from_slurm: bool) -> float | None:
    """The earliest of the configured limits, as UNIX time; None when there is none."""
    return earliest_limit(max_runtime, deadline, from_slurm)[0]


def earliest_limit(max_runtime: float | None, deadline: float | None,
                   from_slurm: bool) -> tuple[float, str] | tuple[None, None]:
    """The earliest configured limit (UNIX time) and its kind: "max_runtime", or "deadline" (the
    ``deadline`` option or the SLURM job's end); (None, None) when there is none."""
    limits = [(time.time() + max_runtime, "max_runtime")] if max_runtime is not None else []
    if deadline is not None:
        limits.append((deadline, "deadline"))
    if from_slurm:
        end = slurm_end_time()
        if end is not None:
            limits.append((end, "deadline"))
    finite = [limit for limit in limits if math.isfinite(limit[0])]
    return min(finite) if finite else (None, None)


class StopAgreement:
    """Under torch.distributed, every rank stops at the same step when any one of them must stop.

    Each ``step()`` contributes its local decision to an all-reduce (MAX) on a gloo group (CPU: no GPU
    synchronisation in the training loop) that is started at this step and read at the next one, so
    its latency hides behind a step.  Every rank reads the same reduced value at the same step.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group: Any = None
        self._pending: tuple[Any, Any] | None = None
        if self._active:
            # Its own gloo group: never interleaved with the training's collectives, and on CPU even
            # when training uses NCCL.  Creating it is collective: every rank creates its manager.
            self._group = dist.new_group(backend="gloo")

    @property
    def active(self) -> bool:
        return self._active

    def poll(self, local_stop: bool) -> bool:
        """True when some rank asked to stop one step ago (every rank gets the same answer)."""
        import torch

        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(local_stop)], dtype=torch.int32)
        work = self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return agreed

    def drain(self) -> None:
        """Complete the all-reduce in flight (every rank does, at close)."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()


class Stops:
    """One manager's stop decision: this process's reasons (a stop signal, a deadline that the next
    step and save would miss), agreed by every rank under torch.distributed so all stop at one step.

    The signal handlers are installed on creation; :meth:`release` gives them back (and completes the
    agreement's collective in flight, which every rank must do).
    """

    def __init__(self, signals: Sequence[signal.Signals], deadline: float | None, margin: float,
                 clock: Callable[[], float] = time.time, timer: Callable[[], float] = time.monotonic,
                 deadline_kind: str | None = None) -> None:
        """``clock`` and ``timer`` as for :class:`StopWatch`; ``timer`` also times the saves.
        ``deadline_kind``: what set ``deadline`` ("max_runtime" or "deadline"), for :meth:`cause`."""
        self._watch = StopWatch(signals, deadline=deadline, margin=margin, clock=clock, timer=timer)
        self._deadline_kind = deadline_kind or "deadline"
        self._agreement = StopAgreement()
        self._timer = timer
        self._save_started = 0.0
        self._watch.install()

    def step_done(self) -> None:
        self._watch.step_done()

    def save_started(self) -> None:
        self._save_started = self._timer()

    def save_committed(self) -> None:
        """The save begun at the last :meth:`save_started` is durable: its time joins the margin."""
        self._watch.save_took(self._timer() - self._save_started)

    def reason(self) -> str | None:
        """Why to stop at this step, or None; under torch.distributed the same answer on every rank."""
        local = self._watch.reason()
        if not self._agreement.active:
            return local
        if self._agreement.poll(local is not None):
            return local or "another rank is stopping"
        return None

    def cause(self) -> tuple[str, str | None]:
        """Why :meth:`reason` said stop, for the event log: ("signal", its name), (the deadline's kind,
        None), or ("other_rank", None) when only another rank asked."""
        if self._watch.requested is not None:
            return "signal", self._watch.requested.name
        if self._watch.deadline is not None and self._watch.reason() is not None:
            return self._deadline_kind, None
        return "other_rank", None

    def uninstall(self) -> None:
        """Give the signal handlers back (a manager replaced in this process stops listening)."""
        self._watch.uninstall()

    def release(self) -> None:
        self._watch.uninstall()
        self._agreement.drain()
