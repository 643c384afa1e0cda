"""The timeline of a run in wall-clock time: one lane per session (a bar from its start to its last
event, coloured by how it ended), with its restore, saves, stop and crash marked on it."""

from __future__ import annotations

import datetime

from unbroken.cli.report.model import RunHistory, Session
from unbroken.cli.report.svg import LEFT, RIGHT, WIDTH, Scale, esc
from unbroken.cli.report.text import format_seconds, format_time

__all__ = ["timeline"]

_LANE_SPACE = 360


def timeline(history: RunHistory) -> str:
    sessions = history.sessions
    if not sessions:
        return '<p class="empty">no sessions recorded</p>'
    times = [s.start_t for s in sessions] + [s.end_t for s in sessions] + [c.t for c in history.crashes]
    lo, hi = min(times), max(times)
    lane = max(4.0, min(24.0, _LANE_SPACE / len(sessions)))
    height = int(lane * len(sessions) + 40)
    sx = Scale(lo, hi, LEFT, WIDTH - RIGHT)
    out = [f'<svg class="timeline" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img">']
    saves_by_session: dict[str, list[float]] = {}
    for save in history.saves:
        saves_by_session.setdefault(save.session, []).append(save.t)
    for i, session in enumerate(sessions):
        out.append(_lane(i, session, sx, lane, saves_by_session.get(session.id, [])))
    for v in sx.ticks(5):
        out.append(f'<text class="tick" x="{sx(v):.1f}" y="{height - 6}" text-anchor="middle">'
                   f"{esc(_clock(v, hi - lo))}</text>")
    out.append("</svg>")
    return "".join(out)


def _lane(i: int, s: Session, sx: Scale, lane: float, saves: list[float]) -> str:
    y = 8 + i * lane
    mid = y + lane * 0.45
    x0, x1 = sx(s.start_t), sx(s.end_t)
    tip = _describe(i, s)
    out = [f'<g class="session" data-ending="{esc(s.ending)}">'
           f'<text class="tick" x="{LEFT - 4}" y="{mid + 3:.1f}" text-anchor="end">#{i + 1}</text>'
           f'<rect class="bar {esc(s.ending.replace(" ", "-"))}" x="{x0:.1f}" y="{y:.1f}" '
           f'width="{max(2.0, x1 - x0):.1f}" height="{lane * 0.9:.1f}"><title>{esc(tip)}</title></rect>']
    if s.restore is not None:
        what = f"restored step {s.restore.step}" if s.restore.step is not None else "fresh start"
        skipped = "".join(f"; skipped {name}: {reason}" for name, reason in s.restore.skipped)
        out.append(_event("restore", sx(s.restore.t), mid, lane, f"{what}{skipped}"))
    for t in saves:
        out.append(f'<line class="ev save" x1="{sx(t):.1f}" y1="{y:.1f}" x2="{sx(t):.1f}" y2="{y + lane * 0.9:.1f}"/>')
    if s.stop is not None:
        out.append(_event("stop", sx(s.stop.t), mid, lane,
                          f"stop ({s.stop.cause}, {s.stop.signal or 'no signal'}) at step {s.stop.step}"))
    if s.crash is not None:
        kind = "preempted" if s.crash.preempted else "crash"
        out.append(_event(kind, sx(s.crash.t), mid, lane, f"{kind}: exit status {s.crash.exit_status}"))
    out.append("</g>")
    return "".join(out)


def _event(kind: str, x: float, y: float, lane: float, tip: str) -> str:
    r = max(2.0, min(6.0, lane * 0.3))
    return (f'<circle class="ev {kind}" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}">'
            f"<title>{esc(tip)}</title></circle>")


def _describe(i: int, s: Session) -> str:
    steps = f"steps {s.first_step}-{s.last_step}" if s.first_step is not None else "no steps"
    return (f"session {i + 1} ({s.id}) on {s.host or '?'} pid {s.pid}: {format_time(s.start_t)} to "
            f"{format_time(s.end_t)} ({format_seconds(max(0.0, s.end_t - s.start_t))}), {steps}, {s.ending}")


def _clock(t: float, span: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(t)
    except (OverflowError, ValueError, OSError):
        return f"{t:.4g}"
    return moment.strftime("%H:%M:%S" if span < 86400 else "%m-%d %H:%M")
