"""The run's event log: what happened to a run, one JSON line per event (docs/EVENTS.md is the schema).

Written by the manager (start, restore, save, save_failed, retention, quarantine, stop, metrics,
close) and by ``unbroken run`` (crash); the file format and its reader are
:mod:`unbroken.manager.event_log_format` (``unbroken report`` reads through it).

Invariants:

* Telemetry never costs the training: a failure to write an event (full disk, a directory where
  the log should be, an unreachable bucket) is warned about once and otherwise ignored, and so is an
  exception raised by the user's ``on_event`` callback.  Events are not fsynced.
* A local log is one file, ``RUN/events.jsonl``, appended to by every process of the run (each
  line one ``write()`` on an ``O_APPEND`` descriptor, so lines never interleave), never rewritten.
  A line torn by a crash is skipped by the reader; the next writer starts on a fresh line.
* Object stores cannot append: a URL run keeps each session's lines in memory and uploads them whole
  as ``RUN/events/<session>.jsonl`` after each committed save, at a stop and at close (bounded in
  size: past :data:`_OBJECT_BUFFER_MAX` bytes its metrics lines are dropped).
* Under torch.distributed only rank 0 writes the log; every rank's ``on_event`` and ``stats`` see
  that rank's own events.
* Import-light (no torch): ``unbroken run`` and ``unbroken report`` use it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .._internal.version import __version__
from .._internal.warn import warn
from ..errors import UnbrokenError
from ..storage import LocalStorage, Storage, is_url, step_name
from ..storage.paths import open_run
from .event_log_format import EVENTS_DIR, EVENTS_FILE, SCHEMA_VERSION

if TYPE_CHECKING:
    from ..format import Manifest

__all__ = ["EventLog", "SaveStats", "metrics_stride"]


OnEvent = Callable[[dict[str, Any]], None]

_FULL_METRICS_STEPS = 1000    # metrics at every step below 2 * this, then ~this many lines per doubling of steps
_MAX_METRIC_VALUES = 32       # values kept per metrics line (the first ones given)
_MAX_NAME = 100               # characters kept of a metric name
_MAX_TEXT = 500               # characters kept of an error or a reason
_OBJECT_BUFFER_MAX = 4 << 20  # bytes of one URL session's log past which metrics lines are dropped


def metrics_stride(step: int) -> int:
    """Steps between two metrics lines near ``step``: 1 below step 2,000, then 2 up to 4,000, 4 up to
    8,000, ...: about 1,000 lines per doubling of the step count (some 21,000 lines by step 10**9)."""
    return 1 << max(0, (max(step, 0) // _FULL_METRICS_STEPS).bit_length() - 1)


def one_line(text: object) -> str:
    """An error or reason as one line of at most :data:`_MAX_TEXT` characters; an exception of the
    package by its message (which names the problem), any other with its type."""
    if isinstance(text, BaseException) and not (isinstance(text, UnbrokenError) and str(text)):
        text = f"{type(text).__name__}: {text}" if str(text) else type(text).__name__
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_TEXT else line[:_MAX_TEXT - 3] + "..."


@dataclass(frozen=True)
class SaveStats:
    """``ckpt.stats``: the last committed save's figures and this manager's totals.

    Attributes:
        step, bytes: the last committed save (None before the first).
        stall_s: seconds ``step()``/``save()`` blocked for it (an async save: until the state was staged).
        commit_s: seconds from its start to its commit (every byte durable).
        throughput_bps: ``bytes / commit_s`` (None when ``commit_s`` is 0).
        saves, failed_saves: saves committed and saves failed by this manager.
        total_stall_s: seconds all of this manager's saves blocked training.
    """

    step: int | None = None
    bytes: int | None = None
    stall_s: float | None = None
    commit_s: float | None = None
    throughput_bps: float | None = None
    saves: int = 0
    failed_saves: int = 0
    total_stall_s: float = 0.0

    def scalars(self, prefix: str = "checkpoint/") -> dict[str, float]:
        """The figures that are numbers, keyed ``prefix + name``: one ``wandb.log(ckpt.stats.scalars())``."""
        figures = {"bytes": self.bytes, "stall_s": self.stall_s, "commit_s": self.commit_s,
                   "throughput_bps": self.throughput_bps, "saves": self.saves, "failed_saves": self.failed_saves,
                   "total_stall_s": self.total_stall_s}
        return {prefix + name: float(value) for name, value in figures.items() if value is not None}


class _FileSink:
    """Appends lines to a local file; opened at the first line, on a fresh line if the last one was torn."""

    def __init__(self, path: str) -> None:
        self.where = path
        self._fd: int | None = None

    def write(self, line: bytes, *, droppable: bool = False) -> None:  # noqa: ARG002 (a file never drops)
        if self._fd is None:
            fd = os.open(self.where, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn line ends here, and the reader skips it
            self._fd = fd
            self._closer = weakref.finalize(self, os.close, fd)  # a manager dropped without close()
        os.write(self._fd, line)

    def pending(self) -> bytes | None:
        return None  # every line is written at once

    def upload(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        if self._fd is not None:
            self._fd = None
            self._closer()


class _ObjectSink:
    """A session's lines in memory, uploaded whole to ``RUN/events/<session>.jsonl`` at :meth:`flush`."""

    def __init__(self, storage: Any, session: str) -> None:
        self._storage, self._buffer = storage, bytearray()
        self._path = storage.path(EVENTS_DIR, f"{session}.jsonl")
        self.where = storage.where(EVENTS_DIR, f"{session}.jsonl")

    def write(self, line: bytes, *, droppable: bool = False) -> None:
        if not (droppable and len(self._buffer) + len(line) > _OBJECT_BUFFER_MAX):
            self._buffer += line

    def pending(self) -> bytes | None:
        """The whole session so far, when it has lines (under the log's lock)."""
        return bytes(self._buffer) if self._buffer else None

    def upload(self, data: bytes) -> None:
        """Replace the session's object with ``data`` (outside the log's lock: events go on meanwhile)."""
        self._storage.put_whole(self._path, data, self.where)

    def close(self) -> None:
        pass  # EventLog.close uploads the last lines


class _PendingSave:
    """A save's figures until both its stall (training thread) and its commit (writer) are known."""

    def __init__(self, step: int, reason: str, background: bool, started: float) -> None:
        self.step, self.reason, self.background, self.started = step, reason, background, started
        self.stall_s: float | None = None
        self.committed: tuple[int, float] | None = None  # bytes, commit_s
        self.removed: list[str] = []  # retention after its commit, told after it


class EventLog:
    """One session's writer of a run's event log (a manager's, or ``unbroken run``'s), and its ``stats``.

    Every method is safe to call from any thread and never raises.
    """

    def __init__(self, sink: _FileSink | _ObjectSink | None, *, on_event: OnEvent | None = None, rank: int = 0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        """``sink``: where lines go (None: only to ``on_event``); ``clock``: monotonic seconds that time
        saves and restores; ``wall``: UNIX time, each event's ``t``."""
        self.session = secrets.token_hex(8)
        self.rank = rank
        self._sink, self._on_event, self._clock, self._wall = sink, on_event, clock, wall
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()
        self._warned: set[str] = set()
        self._closed = False
        self._pending: _PendingSave | None = None
        self._skipped: dict[str, str] = {}
        self._last_metrics: int | None = None
        self._stats = SaveStats()

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def for_storage(cls, storage: Storage | None, **kwargs: Any) -> EventLog:
        """The log of the run in ``storage`` (None, or a store it cannot be written to: no file)."""
        log = cls(None, **kwargs)
        if isinstance(storage, LocalStorage):
            log._sink = _FileSink(os.path.join(storage.root, EVENTS_FILE))
        elif storage is not None and callable(getattr(storage, "put_whole", None)):
            log._sink = _ObjectSink(storage, log.session)
        return log

    @classmethod
    def for_run(cls, run: str | os.PathLike[str], **kwargs: Any) -> EventLog:
        """The log of the run directory ``run`` (``unbroken run --dir``); a local one is created if needed."""
        try:
            if is_url(run):
                return cls.for_storage(open_run(run, create=True), **kwargs)
            os.makedirs(run, exist_ok=True)
            return cls(_FileSink(os.path.join(os.fspath(run), EVENTS_FILE)), **kwargs)
        except Exception as exc:  # the supervisor supervises whether or not its log can be written
            warn(f"the event log of {os.fspath(run)} cannot be written ({one_line(exc)}); no events recorded",
                 RuntimeWarning)
            return cls(None, **kwargs)

    @classmethod
    def for_manager(cls, storage: Storage, *, writes: bool, enabled: bool, on_event: OnEvent | None, rank: int,
                    world_size: int, clock: Callable[[], float]) -> EventLog:
        """A manager's log (``writes``: this rank writes the file), after its ``start`` event."""
        log = cls.for_storage(storage if writes and enabled else None, on_event=on_event, rank=rank, clock=clock)
        torch = sys.modules.get("torch")
        restart = os.environ.get("UNBROKEN_RESTART", "")
        log.emit("start", host=socket.gethostname(), pid=os.getpid(), world_size=world_size,
                 versions={"unbroken": __version__, "torch": getattr(torch, "__version__", None),
                           "python": platform.python_version()},
                 run_dir=storage.url, restart=int(restart) if restart.isdigit() else None)
        return log

    # -- writing --------------------------------------------------------------------------------------
    def emit(self, event: str, *, droppable: bool = False, **fields: Any) -> None:
        """Record one event (to the log, then to ``on_event``).  ``droppable``: may be dropped to bound
        a URL session's buffer (metrics)."""
        if self._closed or (self._sink is None and self._on_event is None):
            return
        record: dict[str, Any] = {"v": SCHEMA_VERSION, "t": self._wall(), "event": event, "session": self.session,
                                  "rank": self.rank, **fields}
        sink = self._sink
        if sink is not None:
            try:
                line = (json.dumps(record, separators=(",", ":"), allow_nan=False, default=str) + "\n").encode()
                with self._lock:
                    sink.write(line, droppable=droppable)
            except Exception as exc:
                self._warn_once("write", f"the event log {sink.where} cannot be written ({one_line(exc)}); "
                                "training continues, and events are not recorded there. Fix: make it writable, or "
                                "pass events=False")
        if self._on_event is not None:
            try:
                self._on_event(record)
            except Exception as exc:
                self._warn_once("callback", f"the on_event callback raised {one_line(exc)}; "
                                "training continues (this warning is shown once)")

    def flush(self) -> None:
        """Upload a URL session's lines now (a local log is always up to date)."""
        if self._sink is not None:
            try:
                with self._upload_lock:  # one upload at a time, each of the newest lines: never an older copy last
                    with self._lock:
                        data = self._sink.pending()
                    if data is not None:
                        self._sink.upload(data)
            except Exception as exc:
                self._warn_once("write", f"the event log {self._sink.where} cannot be written ({one_line(exc)}); "
                                "training continues, and events are not recorded there")

    def close(self, step: int | None, error: BaseException | None = None) -> None:
        """The ``close`` event (``error``: the exception that closed the manager), then nothing more."""
        if self._closed:
            return
        self.emit("close", step=step, error=None if error is None else one_line(error))
        self._closed = True
        if self._sink is not None:
            self.flush()
            try:
                with self._lock:
                    self._sink.close()
            except Exception:  # noqa: S110 (nothing left to record, and nothing to warn about twice)
                pass

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warn(message, RuntimeWarning)

    # -- the manager's events -------------------------------------------------------------------------
    @property
    def stats(self) -> SaveStats:
        return self._stats

    def metrics(self, step: int, values: Mapping[str, Any] | None) -> None:
        """A ``metrics`` event when ``values`` holds numbers and the sampling (:func:`metrics_stride`)
        keeps ``step``."""
        if not values or (self._sink is None and self._on_event is None):
            return
        last = self._last_metrics
        if last is not None and last <= step < last + metrics_stride(step):
            return
        kept: dict[str, float | int | None] = {}
        for name, value in values.items():
            if len(kept) == _MAX_METRIC_VALUES:
                break
            if isinstance(value, numbers.Real):
                number = int(value) if isinstance(value, (bool, numbers.Integral)) else float(value)
                kept[str(name)[:_MAX_NAME]] = number if math.isfinite(number) else None
        if kept:
            self._last_metrics = step
            self.emit("metrics", droppable=True, step=step, values=kept)

    def save_started(self, step: int, reason: str, background: bool) -> None:
        self._pending = _PendingSave(step, reason, background, self._clock())

    def save_stalled(self, step: int, seconds: float) -> None:
        """``step()``/``save()`` returns, ``seconds`` after the save of ``step`` began."""
        with self._lock:
            self._stats = replace(self._stats, total_stall_s=self._stats.total_stall_s + seconds)
            pending = self._pending
            if pending is None or pending.step != step:
                return
            pending.stall_s = seconds
            done = self._claim(pending)
        if done:
            self._save_done(pending)

    def save_committed(self, step: int, nbytes: int) -> None:
        """The save of ``step`` is committed (on the writer thread of an async save)."""
        with self._lock:
            pending = self._pending
            if pending is None or pending.step != step:  # not begun through save_started: no stall known
                pending = _PendingSave(step, "explicit", False, self._clock())
                pending.stall_s = 0.0
            pending.committed = (nbytes, self._clock() - pending.started)
            done = self._claim(pending)
        if done:
            self._save_done(pending)
        self.flush()

    def _claim(self, pending: _PendingSave) -> bool:
        """Under the lock: True once, for the thread that completes ``pending``'s figures."""
        if pending.committed is None or pending.stall_s is None:
            return False
        if self._pending is pending:
            self._pending = None
        return True

    def _save_done(self, pending: _PendingSave) -> None:
        if pending.committed is None or pending.stall_s is None:
            return  # never: _claim said both are known
        nbytes, commit_s = pending.committed
        throughput = nbytes / commit_s if commit_s > 0 else None
        with self._lock:
            stats = self._stats
            self._stats = SaveStats(pending.step, nbytes, pending.stall_s, commit_s, throughput, stats.saves + 1,
                                    stats.failed_saves, stats.total_stall_s)
        self.emit("save", step=pending.step, bytes=nbytes, stall_s=pending.stall_s, commit_s=commit_s,
                  throughput_bps=throughput, reason=pending.reason, **{"async": pending.background})
        self.removed(pending.removed)

    def save_failed(self, step: int | None, error: BaseException) -> None:
        with self._lock:
            if self._pending is not None and self._pending.step == step:
                self._pending = None
            self._stats = replace(self._stats, failed_saves=self._stats.failed_saves + 1)
        self.emit("save_failed", step=step, error=one_line(error))

    def skipped(self, name: str, reason: object) -> None:
        """A checkpoint skipped by the restore in progress (told once per checkpoint, in its ``restore`` event)."""
        self._skipped.setdefault(name, one_line(reason))

    def restored(self, manifest: Manifest | None, seconds: float, from_this_run: bool = True) -> None:
        """A restore of ``manifest`` (None: a fresh start) that took ``seconds``; ``from_this_run`` False:
        from a checkpoint outside the run (``restore(path=...)``)."""
        skipped = [{"name": name, "reason": reason} for name, reason in self._skipped.items()]
        self._skipped = {}
        step = None if manifest is None else manifest.step
        self.emit("restore", step=step, checkpoint=None if step is None else step_name(step), skipped=skipped,
                  seconds=seconds, bytes=None if manifest is None else manifest.total_bytes,
                  **({} if from_this_run else {"external": True}))

    def quarantined(self, name: str, to: str, reason: object) -> None:
        self.skipped(name, reason)
        self.emit("quarantine", name=name, to=to, reason=one_line(reason))

    def removed(self, names: list[str]) -> None:
        """Checkpoints deleted by retention; told after the ``save`` event of the commit that caused it."""
        with self._lock:
            pending = self._pending
            if names and pending is not None and pending.committed is not None:
                pending.removed += names
                return
        if names:
            self.emit("retention", removed=names)

    def stopped(self, step: int, cause: str, signal: str | None) -> None:
        self.emit("stop", step=step, cause=cause, signal=signal)
        self.flush()
