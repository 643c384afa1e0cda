"""``unbroken report RUN``: the run's history as one self-contained HTML page (inline CSS and SVG, no
script, nothing fetched), readable offline and attachable to a bug report.

Sections: a summary; the timeline of sessions, restores, crashes and pre-emptions; one chart per metric
over steps with every restart marked at the step it resumed from; save stall and time to commit per
save; bytes per save and bytes kept in the run over time with retention's removals; a table of events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from unbroken.cli.report.model import RunHistory
from unbroken.cli.report.svg import Chart, Marker, Series, esc, line_chart
from unbroken.cli.report.text import format_seconds, format_time
from unbroken.cli.report.timeline import timeline
from unbroken.cli.units import format_size

__all__ = ["render_html"]

MAX_METRIC_CHARTS = 60
MAX_TABLE_ROWS = 500

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
_SERIES_CSS = "".join(f".s{i} path{{stroke:{c}}}.s{i} .pt,.key.s{i}{{fill:{c};color:{c}}}\n"
                      for i, c in enumerate(_COLOURS))
_CSS = _SERIES_CSS + """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:820px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.summary{color:#444}.empty,.note{color:#777;font-style:italic}
figure{margin:12px 0}figcaption{font-weight:600;margin-bottom:2px}
svg{display:block;overflow:visible}.axis{stroke:#888}.grid{stroke:#eee}.tick{font-size:10px;fill:#666}
.series path{fill:none;stroke-width:1.5}.pt{stroke:none}.gap{stroke:#d00;stroke-width:2}
.key{font-weight:normal;margin-left:8px}
.marker line{stroke:#c33;stroke-dasharray:4 3}.marker text{font-size:10px;fill:#c33}
.marker.removal line{stroke:#999;stroke-dasharray:2 3}
.bar{fill:#9c9}.bar.crashed,.bar.closed-by-an-error{fill:#e99}.bar.pre-empted,.bar.stopped{fill:#fc8}.bar.no-end-recorded{fill:#ccc}
.ev.save{stroke:#363;stroke-width:1}.ev.restore{fill:#36c}.ev.crash{fill:#c00}.ev.preempted,.ev.stop{fill:#e80}
.legend span{margin-right:14px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
table{border-collapse:collapse;font-size:12px}
td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
"""

_LEGEND_KEYS = (("#9c9", "closed"), ("#e99", "crashed or closed by an error"), ("#fc8", "pre-empted or stopped"),
                ("#ccc", "no end recorded"), ("#36c", "restore"), ("#c00", "crash"), ("#e80", "stop"), ("#363", "save"))
_LEGEND = ('<p class="legend">'
           + "".join(f'<span><i style="background:{c}"></i>{what}</span>' for c, what in _LEGEND_KEYS) + "</p>")


def render_html(history: RunHistory, source: str) -> str:
    body = "".join(_sections(history, source))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>unbroken report: {esc(source)}'
            f"</title><style>{_CSS}</style></head><body>{body}</body></html>\n")


def _sections(history: RunHistory, source: str) -> Iterator[str]:
    yield f"<h1>Run {esc(source)}</h1>"
    yield (f'<p class="summary" id="summary">{len(history.sessions)} session(s), {len(history.real_crashes)} '
           f"crash(es), {history.preemptions} pre-emption(s), {len(history.saves)} save(s), last step "
           f"{esc(history.last_step if history.last_step is not None else '-')}</p>")
    yield f'<h2>Timeline</h2>{_LEGEND}<section id="timeline">{timeline(history)}</section>'
    yield '<h2>Metrics</h2><section id="metrics">'
    yield from _metric_charts(history)
    yield '</section><h2>Saves</h2><section id="saves">'
    yield from _save_charts(history)
    yield '</section><h2>Sessions</h2><section id="sessions">'
    yield _sessions_table(history)
    yield '</section><h2>Events</h2><section id="events">'
    yield _events_table(history)
    yield "</section>"


def _restart_markers(history: RunHistory) -> list[Marker]:
    return [Marker(float(step), f"session #{index + 1} resumed from step {step}", tag=f"#{index + 1}@{step}")
            for index, step in history.restarts]


def _metric_charts(history: RunHistory) -> Iterator[str]:
    if not history.metrics:
        yield '<p class="empty">no metrics reported to step()</p>'
        return
    markers = _restart_markers(history)
    if len(history.sessions) > 1:
        keys = " ".join(f'<span class="key s{i % 8}">#{i + 1}</span>' for i in range(len(history.sessions)))
        yield (f'<p class="legend">Each session\'s points in its own colour: {keys}; a dashed line #N@S: session N '
               "resumed from step S (the steps after S that an earlier session reached are drawn again).</p>")
    for shown, (name, points) in enumerate(history.metrics.items()):
        if shown == MAX_METRIC_CHARTS:
            yield f'<p class="note">{len(history.metrics) - shown} more metric(s) not drawn; see --text.</p>'
            return
        by_session: dict[int, list[tuple[float, float | None]]] = {}
        for p in points:
            by_session.setdefault(p.session, []).append((float(p.step), p.value))
        # One series per session, coloured by session: the steps a restart replays show as two lines.
        series = [Series(name, pts, _metric_label(name, session), css=session) for session, pts in by_session.items()]
        yield line_chart(Chart(name, series, markers), "chart metric")


def _metric_label(name: str, session: int) -> Callable[[float, float | None], str]:
    return lambda x, y: f"{name} at step {x:.0f}: {'missing or not finite' if y is None else f'{y:.6g}'} " \
                        f"(session #{session + 1})"


def _save_charts(history: RunHistory) -> Iterator[str]:
    if not history.saves:
        yield '<p class="empty">no saves recorded</p>'
        return
    markers = _restart_markers(history)
    stalls = [(float(s.step), s.stall_s) for s in history.saves if s.stall_s is not None]
    stall = Series("stall (step() blocked)", stalls,
                   lambda x, y: f"save at step {x:.0f}: stall {_seconds(y)}")
    commit = Series("time to commit", [(float(s.step), s.commit_s) for s in history.saves if s.commit_s is not None],
                    lambda x, y: f"save at step {x:.0f}: committed after {_seconds(y)}", css=1)
    yield line_chart(Chart("Save stall and time to commit", [stall, commit], markers, y_format=_seconds,
                           legend=True, y_from_zero=True), "chart saves")
    size = Series("bytes", [(float(s.step), float(s.bytes)) for s in history.saves if s.bytes is not None],
                  lambda x, y: f"save at step {x:.0f}: {_bytes(y)}")
    yield line_chart(Chart("Checkpoint size per save", [size], markers, y_format=_bytes, y_from_zero=True),
                     "chart sizes")
    kept = Series("kept", [(t, float(b)) for t, b in history.kept_bytes()],
                  lambda x, y: f"{format_time(x)}: {_bytes(y)} kept", step_line=True)
    removals = [Marker(t, f"removed {name}", "removal") for t, name in history.removals]
    yield line_chart(Chart("Bytes kept in the run (saves add, retention and quarantine remove)", [kept], removals,
                           x_format=_clock, y_format=_bytes, x_label="time", y_from_zero=True), "chart kept")


def _sessions_table(history: RunHistory) -> str:
    rows = ["<tr><th>#</th><th>started</th><th>ended</th><th>host:pid</th><th>steps</th><th>began</th>"
            "<th>ended by</th></tr>"]
    for i, s in enumerate(history.sessions[:MAX_TABLE_ROWS], start=1):
        began = "-" if s.restore is None else (f"resumed from step {s.restore.step}" if s.restore.step is not None
                                               else "fresh start")
        steps = f"{s.first_step}-{s.last_step}" if s.first_step is not None else "-"
        rows.append(f"<tr><td>{i}</td><td>{esc(format_time(s.start_t))}</td><td>{esc(format_time(s.end_t))}</td>"
                    f"<td>{esc(s.host or '?')}:{esc(s.pid)}</td><td>{esc(steps)}</td><td>{esc(began)}</td>"
                    f"<td>{esc(s.ending)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>" if history.sessions else '<p class="empty">none</p>'


def _events_table(history: RunHistory) -> str:
    events: list[tuple[float, str]] = []
    for s in history.sessions:
        if s.restore is not None:
            for name, reason in s.restore.skipped:
                events.append((s.restore.t, f"restore skipped {name}: {reason}"))
        if s.stop is not None:
            events.append((s.stop.t, f"stop at step {s.stop.step}: {s.stop.cause} {s.stop.signal or ''}"))
        if s.close_error:
            events.append((s.end_t, f"closed by an error: {s.close_error}"))
    events += [(c.t, "pre-empted (exit 75)" if c.preempted else f"crash: exit status {c.exit_status}, restart "
                f"{c.restart}") for c in history.crashes]
    events += [(t, f"retention removed {name}") for t, name in history.removals]
    events += [(t, f"quarantined {name}: {reason}") for t, name, reason in history.quarantines]
    events += [(t, f"save of step {step} failed: {error}") for t, step, error in history.failed_saves]
    if not events:
        return '<p class="empty">no crashes, stops, removals or failures</p>'
    events.sort(key=lambda e: e[0])
    rows = "".join(f"<tr><td>{esc(format_time(t))}</td><td>{esc(what)}</td></tr>"
                   for t, what in events[:MAX_TABLE_ROWS])
    more = f'<p class="note">{len(events) - MAX_TABLE_ROWS} more not shown</p>' if len(events) > MAX_TABLE_ROWS else ""
    return f"<table>{rows}</table>{more}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else format_seconds(value)


def _bytes(value: float | None) -> str:
    return "-" if value is None else format_size(int(value))


def _clock(t: float) -> str:
    return format_time(t)[11:]
