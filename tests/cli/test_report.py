"""``unbroken report RUN`` (issue 18 item 5): a run's history from its event log, as one self-contained
HTML page and as a terminal summary.  The log is written here line by line to the schema the manager
writes (docs: README "What happened to my run?"), for a run that crashed twice and was pre-empted once.

The page is checked in a real browser where Debian's ``chromium`` is installed (``make test`` installs
it when it can): it renders with nothing on the console, and every plot holds every point.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from unbroken.cli.main import main
from unbroken.cli.report.html import render_html
from unbroken.cli.report.model import RunHistory, build_history
from unbroken.cli.report.svg import MAX_POINTS, TOP
from unbroken.cli.report.text import render_text
from unbroken.manager.event_log_format import read_events
from unbroken.manager.events import EventLog

T0 = 1_700_000_000.0
EVIL = "<script>alert('x')</script>"
EVIL_HOST = '"><img src=x onerror=alert(1)>'


def _event(t: float, kind: str, session: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "t": t, "event": kind, "session": session, "rank": 0, **fields}


def _session(events: list[dict[str, Any]], sid: str, t: float, restored: int | None, steps: range,
             saves: tuple[int, ...], host: str = "node-1", skipped: tuple[tuple[str, str], ...] = (),
             null_at: int | None = None) -> float:
    """Appends one session's events from time ``t``; returns the time of its last event."""
    events.append(_event(t, "start", sid, host=host, pid=1000 + len(events), world_size=1,
                         versions={"unbroken": "0.1", "torch": "2.13", "python": "3.12"}, run_dir="/runs/x"))
    events.append(_event(t + 0.5, "restore", sid, step=restored,
                         checkpoint=None if restored is None else f"step_{restored:09d}",
                         skipped=[{"name": n, "reason": r} for n, r in skipped], seconds=0.25, bytes=4000))
    t += 1
    for step in steps:
        t += 1
        loss = None if step == null_at else 1.0 / step
        events.append(_event(t, "metrics", sid, step=step, values={"loss": loss, "acc": step / 100}))
        if step in saves:
            events.append(_event(t + 0.1, "save", sid, step=step, bytes=1000 * step, stall_s=step / 1000,
                                 commit_s=step / 100, throughput_bps=1e6, reason="schedule", **{"async": True}))
    return t


def crashed_twice_and_preempted() -> list[dict[str, Any]]:
    """Session 1 from scratch crashes (SIGKILL) at step 35 after saving 30; session 2 resumes from 30 and
    crashes (exit 1) at 55 after saving 50; session 3 finds 50 corrupt, resumes from 40 and is pre-empted
    at 70 (SIGTERM, saves, exit 75); session 4 resumes from 70 and finishes at 100.  loss is missing at
    step 45 (a NaN the writer stored as null)."""
    ev: list[dict[str, Any]] = []
    t = _session(ev, "a1", T0, None, range(1, 36), (10, 20, 30))
    ev.append(_event(t - 5, "retention", "a1", removed=["step_000000010"]))
    ev.append(_event(t + 1, "crash", "sup", exit_status=-9, restart=1, backoff_s=1.0, preempted=False))
    t = _session(ev, "b2", t + 3, 30, range(31, 56), (40, 50))
    ev.append(_event(t + 1, "crash", "sup", exit_status=1, restart=2, backoff_s=2.0, preempted=False))
    t = _session(ev, "c3", t + 4, 40, range(41, 71), (), host=EVIL_HOST,
                 skipped=(("step_000000050", "checksum mismatch in data_0.bin"),), null_at=45)
    ev.append(_event(t - 29, "quarantine", "c3", name="step_000000050", to="corrupt-step_000000050-x",
                     reason="checksum mismatch"))
    ev.append(_event(t + 0.2, "stop", "c3", step=70, cause="signal", signal="SIGTERM"))
    ev.append(_event(t + 0.4, "save", "c3", step=70, bytes=70_000, stall_s=0.5, commit_s=0.5, throughput_bps=1e6,
                     reason="stop", **{"async": False}))
    ev.append(_event(t + 1, "crash", "sup", exit_status=75, restart=3, backoff_s=0.0, preempted=True))
    t = _session(ev, "d4", t + 60, 70, range(71, 101), (80, 90, 100))
    ev.append(_event(t + 1, "close", "d4", step=100))
    return ev


def write_log(run: Path, events: list[dict[str, Any]], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "events.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
        f.write(tail)
    return run


def history_of(events: list[dict[str, Any]]) -> RunHistory:
    return build_history(events)


def report(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["report", *argv])
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- the model


def test_every_restart_is_marked_at_the_step_its_session_resumed_from() -> None:
    history = history_of(crashed_twice_and_preempted())
    assert history.restarts == [(1, 30), (2, 40), (3, 70)]
    assert [s.ending for s in history.sessions] == ["crashed", "crashed", "pre-empted", "closed"]
    assert len(history.real_crashes) == 2 and history.preemptions == 1
    assert [s.crash.exit_status if s.crash else None for s in history.sessions] == [-9, 1, 75, None]
    third = history.sessions[2].restore
    assert third is not None and third.skipped == (("step_000000050", "checksum mismatch in data_0.bin"),)
    assert history.last_step == 100


def test_each_save_keeps_its_stall_time_to_commit_and_size() -> None:
    history = history_of(crashed_twice_and_preempted())
    assert [s.step for s in history.saves] == [10, 20, 30, 40, 50, 70, 80, 90, 100]
    assert [s.stall_s for s in history.saves][:3] == [0.01, 0.02, 0.03]
    assert history.saves[5].reason == "stop" and history.saves[5].commit_s == 0.5
    # step 10 removed by retention, step 50 quarantined: what is left is 20, 30, 40, 70, 80, 90, 100
    assert history.kept_bytes()[-1][1] == 1000 * (20 + 30 + 40 + 70 + 80 + 90 + 100)


def test_metrics_keep_every_step_of_every_session_and_a_missing_value_as_a_gap() -> None:
    history = history_of(crashed_twice_and_preempted())
    loss = history.metrics["loss"]
    assert len(loss) == 35 + 25 + 30 + 30
    assert [p.value for p in loss if p.step == 45] == [1 / 45, None]  # session 2's, then session 3's (null)
    assert {p.session for p in loss if p.step == 45} == {1, 2}


def test_a_torn_last_line_and_damaged_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    events = crashed_twice_and_preempted()
    run = write_log(tmp_path / "run", events, tail='{"v": 1, "t": 1.0, "event": "sa')
    lines = (run / "events.jsonl").read_text().splitlines(keepends=True)
    lines.insert(3, "not json\n")
    lines.insert(5, "[1, 2]\n")
    (run / "events.jsonl").write_text("".join(lines))
    assert len(read_events(run)) == len(events)
    code, out, _ = report(str(run), "--text")
    assert code == 0 and "4 sessions, 2 crashes, 1 pre-emption" in out


def test_a_session_closed_by_an_error_says_so() -> None:
    events = [_event(T0, "start", "s", host="h", pid=1),
              _event(T0 + 1, "close", "s", step=3, error="RuntimeError: CUDA out of memory")]
    history = build_history(events)
    assert history.sessions[0].ending == "closed by an error"
    assert "ended: closed by an error (RuntimeError: CUDA out of memory)" in render_text(history, "run")
    assert "closed by an error: RuntimeError: CUDA out of memory" in render_html(history, "run")


def test_events_of_wrong_types_and_unknown_kinds_are_ignored() -> None:
    events: list[Any] = [
        _event(T0, "start", "s", host=7, pid="x", versions=[1]),
        _event(T0 + 1, "metrics", "s", step="3", values={"loss": 1.0}),
        _event(T0 + 2, "metrics", "s", step=4, values=[1, 2]),
        _event(T0 + 3, "metrics", "s", step=5, values={"loss": "high", "big": 10**400, "inf": math.inf}),
        _event(T0 + 4, "save", "s", step=5, bytes="many", stall_s=True),
        _event(T0 + 5, "future_kind", "s", step=6),
        {"t": "soon", "event": "save"}, {"event": "close"}, [1, 2], None,
        _event(math.nan, "save", "s", step=9),
    ]
    history = build_history(events)
    assert history.sessions[0].host is None and history.sessions[0].pid is None
    assert [(p.step, p.value) for p in history.metrics["loss"]] == [(5, None)]
    assert history.metrics["big"][0].value is None and history.metrics["inf"][0].value is None
    assert history.saves[0].bytes is None and history.saves[0].stall_s is None
    render_html(history, "run")
    render_text(history, "run")


# ---------------------------------------------------------------- the page, without a browser


class _Dom(HTMLParser):
    """The elements of a page: (tag, attributes, the data-title of the figure it is in)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.text: list[str] = []
        self._figure: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "figure":
            self._figure = a.get("data-title")
        self.elements.append((tag, a, self._figure))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def points(self, figure: str, series: str | None = None) -> int:
        return sum(1 for tag, a, f in self.elements if tag == "circle" and f == figure
                   and "pt" in a.get("class", "").split() and (series is None or a.get("data-series") == series))

    def count(self, tag: str, classes: str) -> int:
        want = set(classes.split())
        return sum(1 for t, a, _ in self.elements if t == tag and want <= set(a.get("class", "").split()))


def assert_plots_hold_every_point(dom: _Dom) -> None:
    assert dom.points("loss", "loss") == 119  # 120 steps reported, one of them null
    assert dom.points("acc", "acc") == 120
    assert dom.points("Save stall and time to commit", "stall (step() blocked)") == 9
    assert dom.points("Save stall and time to commit", "time to commit") == 9
    assert dom.points("Checkpoint size per save") == 9
    assert dom.points("Bytes kept in the run (saves add, retention and quarantine remove)") == 9 + 1 + 1
    restarts = [a["data-x"] for t, a, f in dom.elements if t == "g" and f == "loss" and "restart" in a.get("class", "")]
    assert restarts == ["30", "40", "70"]
    assert dom.count("line", "gap") == 1
    assert dom.count("g", "session") == 4
    assert dom.count("circle", "ev crash") == 2 and dom.count("circle", "ev preempted") == 1
    assert dom.count("circle", "ev restore") == 4 and dom.count("circle", "ev stop") == 1


def test_the_page_plots_every_point_and_marks_every_restart(tmp_path: Path) -> None:
    run = write_log(tmp_path / "run", crashed_twice_and_preempted())
    code, out, err = report(str(run), "-o", str(tmp_path / "r.html"))
    assert code == 0, err
    assert "wrote" in out
    assert_plots_hold_every_point(_Dom((tmp_path / "r.html").read_text()))


def test_names_and_hosts_from_the_log_stay_text_on_the_page() -> None:
    events = crashed_twice_and_preempted()
    for e in events:
        if e["event"] == "metrics":
            e["values"][EVIL] = 1.0
    page = render_html(build_history(events), "run<b>")
    dom = _Dom(page)
    assert [t for t, _, _ in dom.elements if t in ("script", "img", "b")] == []
    assert EVIL in "".join(dom.text) and EVIL_HOST in page.replace("&quot;", '"').replace("&lt;", "<").replace(
        "&gt;", ">").replace("&#x27;", "'").replace("&amp;", "&")
    assert dom.points(EVIL, EVIL) == 120


@pytest.mark.parametrize("events", [
    [],
    [_event(T0, "start", "s", host="h", pid=1)],
    [_event(T0, "metrics", "s", step=1, values={"loss": 0.5})],
    [_event(T0, "metrics", "s", step=1, values={"loss": None}), _event(T0 + 1, "metrics", "s", step=2,
                                                                        values={"loss": None})],
    [_event(T0, "save", "s", step=3, bytes=10, stall_s=0.0, commit_s=0.0)],
    [_event(T0, "metrics", "s", step=1, values={"x": 1e308}), _event(T0, "metrics", "s", step=2, values={"x": -1e308})],
    [_event(T0, "crash", "sup", exit_status=-9, restart=1, preempted=False)],
], ids=["empty", "start-only", "one-point", "all-null", "one-save-zero-times", "extreme-values", "crash-only"])
def test_degenerate_runs_render(events: list[dict[str, Any]]) -> None:
    history = build_history(events)
    page = render_html(history, "run")
    assert "nan" not in page.lower().replace("nan>", "")  # no NaN coordinates
    assert render_text(history, "run").startswith("run run\n")


def test_a_huge_log_is_thinned_for_drawing_and_keeps_its_spikes() -> None:
    events = [_event(T0 + i, "metrics", "s", step=i, values={"loss": 1.0 + (i % 7) / 100}) for i in range(50_000)]
    events[31_337]["values"]["loss"] = 99.0
    dom = _Dom(render_html(build_history(events), "run"))
    drawn = dom.points("loss", "loss")
    assert 2 <= drawn <= MAX_POINTS
    figure = next(a for t, a, _ in dom.elements if t == "figure" and a.get("data-title") == "loss")
    assert figure["data-points"] == "50000" and figure["data-drawn"] == str(drawn)
    spikes = [a for t, a, f in dom.elements if t == "circle" and f == "loss" and "pt" in a.get("class", "")]
    assert min(float(a["cy"]) for a in spikes) == TOP  # the 99.0 is drawn, at the top


# ---------------------------------------------------------------- --text and the command


def test_text_summary_tells_sessions_restores_saves_crashes_stops_and_last_metrics(tmp_path: Path) -> None:
    run = write_log(tmp_path / "run", crashed_twice_and_preempted())
    code, out, _ = report(str(run), "--text")
    assert code == 0
    assert "4 sessions, 2 crashes, 1 pre-emption, 9 saves, last step 100" in out
    assert "fresh start" in out and "resumed from step 30" in out and "resumed from step 70" in out
    assert "skipped step_000000050: checksum mismatch in data_0.bin" in out
    assert "ended: crashed (exit status -9)" in out and "ended: pre-empted (SIGTERM at step 70)" in out
    assert "saves: 9 saves, median stall" in out and "retention removed 1 checkpoint" in out
    assert "quarantined step_000000050" in out
    assert "last metrics (step 100): acc=1 loss=0.01" in out


def test_text_shows_control_characters_from_the_log_escaped() -> None:
    events = [_event(T0, "start", "s", host="evil\x1b[2J\nhost", pid=1)]
    text = render_text(build_history(events), "run")
    assert "\x1b" not in text and "evil\\x1b[2J\\nhost" in text


def test_a_missing_run_or_log_is_exit_2_naming_what_is_missing(tmp_path: Path) -> None:
    code, _, err = report(str(tmp_path / "nope"))
    assert code == 2 and "no such run directory" in err
    (tmp_path / "old").mkdir()
    code, _, err = report(str(tmp_path / "old"))
    assert code == 2 and "no event log (events.jsonl) in this run directory" in err
    run = write_log(tmp_path / "run", [])
    code, _, err = report(str(run), "--text", "-o", str(tmp_path / "x.html"))
    assert code == 2 and "drop one" in err


def test_the_report_reads_the_log_the_manager_writes(tmp_path: Path) -> None:
    """The writer of issue 18 item 4 (EventLog, as the manager drives it), two sessions, then the report."""
    run = tmp_path / "run"
    clock = iter(float(i) for i in range(10_000))
    for session, (restored, steps) in enumerate([(None, range(1, 8)), (4, range(5, 11))]):
        log = EventLog.for_run(run, clock=lambda: next(clock))
        log.emit("start", host="node", pid=100 + session, world_size=1)
        log.emit("restore", step=restored, checkpoint=None, skipped=[], seconds=0.1, bytes=None)
        for step in steps:
            log.metrics(step, {"loss": 1.0 / step, "nan": math.nan})
            if step % 2 == 0:
                log.save_started(step, "schedule", background=False)
                log.save_stalled(step, 0.01)
                log.save_committed(step, 1000 * step)
        if session == 0:
            log.stopped(7, "signal", "SIGTERM")
        log.close(steps[-1])
    history = build_history(read_events(run))
    assert history.restarts == [(1, 4)]
    assert [s.ending for s in history.sessions] == ["pre-empted", "closed"]
    assert [s.step for s in history.saves] == [2, 4, 6, 6, 8, 10]
    assert [(p.step, p.session) for p in history.metrics["loss"]][6:8] == [(7, 0), (5, 1)]
    assert all(p.value is None for p in history.metrics["nan"])
    dom = _Dom(render_html(history, str(run)))
    assert dom.points("loss", "loss") == 7 + 6 and dom.points("nan") == 0 and dom.count("line", "gap") == 13


def test_report_never_imports_torch(tmp_path: Path) -> None:
    run = write_log(tmp_path / "run", crashed_twice_and_preempted())
    code = ("import sys\nfrom unbroken.cli.main import main\n"
            f"assert main(['report', {str(run)!r}, '--text']) == 0\n"
            f"assert main(['report', {str(run)!r}, '-o', {str(tmp_path / 'r.html')!r}]) == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "False"


def test_the_page_goes_to_stdout_with_dash(tmp_path: Path) -> None:
    run = write_log(tmp_path / "run", crashed_twice_and_preempted())
    code, out, _ = report(str(run), "-o", "-")
    assert code == 0 and out.startswith("<!DOCTYPE html>") and out.rstrip().endswith("</html>")


# ---------------------------------------------------------------- in a real browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH: the page is not checked in a browser here "
                "(make test installs Debian's chromium when run as root with apt-get)")


def _browse(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    command = [_chromium(), "--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *mode, page.as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_page_renders_in_chromium_without_console_errors_and_every_point_plotted(tmp_path: Path) -> None:
    run = write_log(tmp_path / "run", crashed_twice_and_preempted())
    page = tmp_path / "report.html"
    assert report(str(run), "-o", str(page))[0] == 0
    shown = _browse(page, tmp_path / "profile", "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    console = [line for line in shown.stderr.splitlines() if "CONSOLE" in line]
    assert console == []  # an SVG attribute Chromium cannot parse is logged here, as is any script error
    assert_plots_hold_every_point(_Dom(shown.stdout))
    picture = tmp_path / "report.png"
    drawn = _browse(page, tmp_path / "profile", f"--screenshot={picture}", "--window-size=900,2400")
    assert drawn.returncode == 0 and picture.stat().st_size > 10_000, drawn.stderr[-2000:]
