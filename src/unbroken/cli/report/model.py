"""A run's history, built from its event log (``RUN/events.jsonl``, read by
:func:`unbroken.manager.event_log_format.read_events`; README "What happened to my run?"): the sessions (one per
process start), how each began (a restore, or a fresh start) and ended (closed, stopped, crashed, or
nothing recorded), the saves, the checkpoints retention removed, and the metrics passed to ``step()``.

The log is written by anyone's training script, so nothing in it is trusted: an event of an unknown
type, a field missing or of the wrong type is ignored or read as "unknown", never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from unbroken.storage.base import parse_step_name

__all__ = ["Crash", "MetricPoint", "Restore", "RunHistory", "Save", "Session", "Stop", "build_history"]


@dataclass(frozen=True)
class Restore:
    t: float
    step: int | None
    """The step resumed from; None: a fresh start (no checkpoint restored)."""
    checkpoint: str | None
    skipped: tuple[tuple[str, str], ...]
    """(name, reason) of each newer checkpoint that could not be restored."""
    seconds: float | None
    bytes: int | None


@dataclass(frozen=True)
class Save:
    t: float
    session: str
    step: int
    bytes: int | None
    stall_s: float | None
    commit_s: float | None
    throughput_bps: float | None
    reason: str


@dataclass(frozen=True)
class Crash:
    """An abnormal exit seen by ``unbroken run``: ``preempted`` for exit status 75 (stopped and saved)."""

    t: float
    exit_status: int | None
    restart: int | None
    preempted: bool


@dataclass(frozen=True)
class Stop:
    t: float
    step: int | None
    cause: str
    signal: str | None


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float | None
    """None for a missing or non-finite value (drawn as a gap)."""
    session: int
    """The index of the session that reported it, in ``RunHistory.sessions``."""


@dataclass
class Session:
    id: str
    start_t: float
    end_t: float
    host: str | None = None
    pid: int | None = None
    world_size: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    restore: Restore | None = None
    first_step: int | None = None
    last_step: int | None = None
    closed: bool = False
    close_error: str | None = None
    """The error that closed the manager (its ``close`` event's ``error``)."""
    stop: Stop | None = None
    crash: Crash | None = None

    @property
    def ending(self) -> str:
        """How the session ended: "closed", "closed by an error", "pre-empted", "stopped", "crashed", or
        "no end recorded" (still running, or killed without ``unbroken run`` watching)."""
        if self.crash is not None and self.crash.preempted or self.stop is not None and self.stop.cause == "signal":
            return "pre-empted"
        if self.stop is not None:
            return "stopped"
        if self.crash is not None:
            return "crashed"
        if self.closed:
            return "closed by an error" if self.close_error else "closed"
        return "no end recorded"


@dataclass
class RunHistory:
    sessions: list[Session] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    failed_saves: list[tuple[float, int | None, str]] = field(default_factory=list)
    removals: list[tuple[float, str]] = field(default_factory=list)
    quarantines: list[tuple[float, str, str]] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    """Every abnormal exit, pre-emptions (exit 75) included; ``real_crashes`` leaves those out."""
    metrics: dict[str, list[MetricPoint]] = field(default_factory=dict)

    @property
    def real_crashes(self) -> list[Crash]:
        return [c for c in self.crashes if not c.preempted]

    @property
    def preemptions(self) -> int:
        return sum(1 for s in self.sessions if s.ending == "pre-empted")

    @property
    def restarts(self) -> list[tuple[int, int]]:
        """(index of the session, step it resumed from; 0 for a fresh start) for every session but the first:
        where the metrics of a restarted run begin again."""
        return [(i, s.restore.step if s.restore is not None and s.restore.step is not None else 0)
                for i, s in enumerate(self.sessions) if i > 0]

    @property
    def last_step(self) -> int | None:
        steps = [s.last_step for s in self.sessions if s.last_step is not None]
        return max(steps) if steps else None

    def kept_bytes(self) -> list[tuple[float, int]]:
        """(time, bytes of the checkpoints still in the run) after each save and each removal."""
        removed = [(t, name) for t, name in self.removals] + [(t, name) for t, name, _ in self.quarantines]
        changes = sorted([(s.t, 0, s.step, s.bytes or 0) for s in self.saves]
                         + [(t, 1, step, 0) for t, step in ((t, parse_step_name(n)) for t, n in removed)
                            if step is not None])
        sizes: dict[int, int] = {}
        series = []
        for t, removal, step, size in changes:
            if removal:
                sizes.pop(step, None)
            else:
                sizes[step] = size
            series.append((t, sum(sizes.values())))
        return series


def build_history(events: Iterable[Mapping[str, Any]]) -> RunHistory:
    """The history the events tell, in the order they were written."""
    history = RunHistory()
    by_id: dict[str, int] = {}
    for event in events:
        if not isinstance(event, Mapping):
            continue
        t = _finite(event.get("t"))
        kind = event.get("event")
        if t is None or not isinstance(kind, str):
            continue
        if kind == "crash":  # written by the supervisor, about the manager session that just ended
            _add_crash(history, event, t)
            continue
        session_id = str(event.get("session", ""))
        index = by_id.get(session_id)
        if index is None:
            index = by_id[session_id] = len(history.sessions)
            history.sessions.append(Session(id=session_id, start_t=t, end_t=t))
        session = history.sessions[index]
        session.end_t = max(session.end_t, t)
        _apply(history, session, index, kind, event, t)
    return history


def _apply(history: RunHistory, session: Session, index: int, kind: str, event: Mapping[str, Any],
           t: float) -> None:
    step = _int(event.get("step"))
    if step is not None and kind in ("metrics", "save", "close", "stop"):
        session.first_step = step if session.first_step is None else min(session.first_step, step)
        session.last_step = step if session.last_step is None else max(session.last_step, step)
    if kind == "start":
        session.start_t = min(session.start_t, t)
        session.host = _str(event.get("host"))
        session.pid = _int(event.get("pid"))
        session.world_size = _int(event.get("world_size"))
        versions = event.get("versions")
        if isinstance(versions, Mapping):
            session.versions = {str(k): str(v) for k, v in versions.items()}
    elif kind == "restore":
        skipped = event.get("skipped")
        session.restore = Restore(
            t=t, step=step, checkpoint=_str(event.get("checkpoint")),
            skipped=tuple((str(s.get("name", "?")), str(s.get("reason", "?")))
                          for s in (skipped if isinstance(skipped, list) else []) if isinstance(s, Mapping)),
            seconds=_finite(event.get("seconds")), bytes=_int(event.get("bytes")))
    elif kind == "save" and step is not None:
        history.saves.append(Save(t=t, session=session.id, step=step, bytes=_int(event.get("bytes")),
                                  stall_s=_finite(event.get("stall_s")), commit_s=_finite(event.get("commit_s")),
                                  throughput_bps=_finite(event.get("throughput_bps")),
                                  reason=_str(event.get("reason")) or "?"))
    elif kind == "save_failed":
        history.failed_saves.append((t, step, _str(event.get("error")) or "?"))
    elif kind == "retention":
        removed = event.get("removed")
        history.removals.extend((t, str(name)) for name in (removed if isinstance(removed, list) else []))
    elif kind == "quarantine":
        history.quarantines.append((t, _str(event.get("name")) or "?", _str(event.get("reason")) or "?"))
    elif kind == "stop":
        session.stop = Stop(t=t, step=step, cause=_str(event.get("cause")) or "?", signal=_str(event.get("signal")))
    elif kind == "close":
        session.closed = True
        session.close_error = _str(event.get("error"))
    elif kind == "metrics" and step is not None:
        values = event.get("values")
        for name, value in (values.items() if isinstance(values, Mapping) else ()):
            history.metrics.setdefault(str(name), []).append(MetricPoint(step, _finite(value), index))


def _add_crash(history: RunHistory, event: Mapping[str, Any], t: float) -> None:
    crash = Crash(t=t, exit_status=_int(event.get("exit_status")), restart=_int(event.get("restart")),
                  preempted=event.get("preempted") is True or _int(event.get("exit_status")) == 75)
    history.crashes.append(crash)
    # The session it ends: the newest one begun before it (the supervisor writes it after the child exited).
    for session in reversed(history.sessions):
        if session.start_t <= t:
            if session.crash is None:
                session.crash = crash
                session.end_t = max(session.end_t, t)
            break


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond a float's range
        return None


def _finite(value: Any) -> float | None:
    number = _float(value)
    return number if number is not None and math.isfinite(number) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
