"""``unbroken report RUN --text``: a run's history for a terminal, one line per fact."""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Iterator

from unbroken.cli.report.model import RunHistory, Session
from unbroken.cli.units import format_size

__all__ = ["render_text", "format_time", "format_seconds"]

_MAX_METRICS = 12


def render_text(history: RunHistory, source: str) -> str:
    return "\n".join(_lines(history, source)) + "\n"


def _lines(history: RunHistory, source: str) -> Iterator[str]:
    yield f"run {_clean(source)}"
    yield (f"  {_count(len(history.sessions), 'session')}, {_count(len(history.real_crashes), 'crash')}, "
           f"{_count(history.preemptions, 'pre-emption')}, {_count(len(history.saves), 'save')}, "
           f"last step {_opt(history.last_step)}")
    if not history.sessions and not history.crashes:
        yield "  the event log holds no events yet"
        return
    yield "sessions:"
    for i, session in enumerate(history.sessions, start=1):
        yield from _session(i, session)
    yield from _saves(history)
    yield from _events(history)
    yield from _last_metrics(history)


def _session(number: int, s: Session) -> Iterator[str]:
    where = f"{_clean(s.host or '?')}:{_opt(s.pid)}"
    steps = f"steps {_opt(s.first_step)}-{_opt(s.last_step)}" if s.first_step is not None else "no steps"
    yield f"  {number}. {format_time(s.start_t)} -> {format_time(s.end_t)}  {where}  {steps}  {_ending(s)}"
    if s.restore is not None:
        r = s.restore
        began = f"resumed from step {r.step}" if r.step is not None else "fresh start (nothing to restore)"
        took = f" in {format_seconds(r.seconds)}" if r.seconds is not None else ""
        yield f"     {began}{took}"
        for name, reason in r.skipped:
            yield f"     skipped {_clean(name)}: {_clean(reason)}"


def _ending(s: Session) -> str:
    ending = s.ending
    if s.stop is not None:
        cause = _clean(s.stop.signal) if s.stop.cause == "signal" and s.stop.signal else _clean(s.stop.cause)
        ending += f" ({cause} at step {_opt(s.stop.step)})"
    elif s.crash is not None:
        ending += f" (exit status {_opt(s.crash.exit_status)})"
    elif s.close_error:
        ending += f" ({_clean(s.close_error)})"
    return "ended: " + ending


def _saves(history: RunHistory) -> Iterator[str]:
    saves = history.saves
    if not saves:
        yield "saves: none"
        return
    stalls = [s.stall_s for s in saves if s.stall_s is not None]
    commits = [s.commit_s for s in saves if s.commit_s is not None]
    sizes = [s.bytes for s in saves if s.bytes is not None]
    parts = [_count(len(saves), "save")]
    if stalls:
        parts.append(f"median stall {format_seconds(statistics.median(stalls))} (max {format_seconds(max(stalls))})")
    if commits:
        parts.append(f"median time to commit {format_seconds(statistics.median(commits))}")
    if sizes:
        parts.append(f"last {format_size(sizes[-1])}")
    if history.failed_saves:
        parts.append(f"{len(history.failed_saves)} failed")
    yield "saves: " + ", ".join(parts)
    removed = len(history.removals)
    if removed:
        yield f"retention removed {_count(removed, 'checkpoint')}"


def _events(history: RunHistory) -> Iterator[str]:
    """Crashes, quarantines and failed saves, in the order they happened."""
    events: list[tuple[float, str]] = []
    for crash in history.crashes:
        kind = "pre-empted (exit 75)" if crash.preempted else f"crash, exit status {_opt(crash.exit_status)}"
        restart = f", restart {crash.restart}" if crash.restart is not None else ""
        events.append((crash.t, f"{kind}{restart}"))
    events += [(t, f"quarantined {_clean(name)}: {_clean(reason)}") for t, name, reason in history.quarantines]
    events += [(t, f"save of step {_opt(step)} FAILED: {_clean(error)}") for t, step, error in history.failed_saves]
    if events:
        yield "events:"
    for t, what in sorted(events, key=lambda e: e[0]):
        yield f"  {format_time(t)}  {what}"


def _last_metrics(history: RunHistory) -> Iterator[str]:
    last = {name: points[-1] for name, points in history.metrics.items() if points}
    if not last:
        yield "metrics: none reported"
        return
    step = max(p.step for p in last.values())
    shown = sorted(last.items())[:_MAX_METRICS]
    values = " ".join(f"{_clean(name)}={'-' if p.value is None else f'{p.value:.6g}'}" for name, p in shown)
    more = f" (+{len(last) - len(shown)} more)" if len(last) > len(shown) else ""
    yield f"last metrics (step {step}): {values}{more}"


def format_time(t: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return f"t={t!r}"


def format_seconds(seconds: float) -> str:
    if seconds < 0:
        return "-" + format_seconds(-seconds)
    if seconds < 1e-9:
        return "0 s"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f} us"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _count(n: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("sh") else "s")
    return f"{n} {noun if n == 1 else plural}"


def _opt(value: object) -> str:
    return "?" if value is None else str(value)


def _clean(text: str) -> str:
    """Text from the log on one terminal line: control characters (an escape sequence, a newline) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
