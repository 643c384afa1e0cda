"""``unbroken report RUN [-o report.html] [--text]``: what happened to a run, from its event log
(``RUN/events.jsonl``): one self-contained HTML page, or a summary for the terminal.

Exit status: 0 the report was written; 2 no such run, or no event log in it; 1 the page could not be
written.  Reads only the log (no checkpoint, no torch), so it works on a run still training.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from unbroken.cli.report.html import render_html
from unbroken.cli.report.model import build_history
from unbroken.cli.report.text import render_text
from unbroken.cli.storage_commands import storage_options
from unbroken.manager.event_log_format import EVENTS_DIR, EVENTS_FILE, read_events
from unbroken.storage import is_url

__all__ = ["add_report"]

DEFAULT_OUTPUT = "report.html"


def add_report(sub: Any) -> None:
    """Registers the ``report`` subcommand."""
    parser = sub.add_parser(
        "report", help="what happened to a run: sessions, restores, crashes, saves, metrics (HTML or --text)",
        description="Read the event log of run directory RUN (RUN/events.jsonl, written by the CheckpointManager "
                    "and by 'unbroken run') and write one self-contained HTML page: the timeline of sessions, "
                    "restores, crashes and pre-emptions; each metric over steps with every restart marked; save "
                    "stall, time to commit and size per save; the bytes kept in the run over time. The page needs "
                    "no network to view. --text prints a summary instead.",
        epilog="Exit status: 0 written; 1 the page could not be written; 2 no such run or no event log.")
    parser.add_argument("run_dir", metavar="RUN", help="a run directory (local or URL)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help=f"where to write the page (default: {DEFAULT_OUTPUT} in the current directory; "
                             "'-' for stdout)")
    parser.add_argument("--text", action="store_true", help="print a summary for the terminal instead of the page")
    # -o is the page, as for export; storage options take the other commands' long spelling.
    parser.add_argument("--storage-option", "--option", dest="option", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec storage option for a URL run (as -o of ls, show, verify)")
    parser.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    source = os.fspath(args.run_dir)
    problem = _missing(source)
    events = read_events(source, storage_options(args, flag="--storage-option")) if problem is None else []
    if problem is None and not events and is_url(source):
        problem = f"{source}: no event log ({EVENTS_DIR}/<session>.jsonl) in this run"
    if problem is not None:
        print(f"unbroken report: error: {problem}; a CheckpointManager writes it as it trains (a run written by "
              "an older unbroken, or by unbroken.save alone, has none)", file=sys.stderr)
        return 2
    history = build_history(events)
    if args.text:
        if args.output:
            print("unbroken report: error: -o writes the HTML page; --text prints to the terminal (drop one)",
                  file=sys.stderr)
            return 2
        sys.stdout.write(render_text(history, source))
        return 0
    page = render_html(history, source)
    output = args.output or DEFAULT_OUTPUT
    if output == "-":
        sys.stdout.write(page)
        return 0
    try:
        with open(output, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(page)
    except OSError as exc:
        print(f"unbroken report: error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {output}: {len(history.sessions)} session(s), {len(history.saves)} save(s), "
          f"{len(history.metrics)} metric(s)")
    return 0


def _missing(run: str) -> str | None:
    """Why local run ``run`` has no log to report on (None: it has one, or it is a URL)."""
    if is_url(run):
        return None
    if not os.path.isdir(run):
        return f"{run}: no such run directory"
    if not os.path.isfile(os.path.join(run, EVENTS_FILE)):
        return f"{run}: no event log ({EVENTS_FILE}) in this run directory"
    return None
