"""Reading a run's event log for the report: ``RUN/events.jsonl`` (or the given ``.jsonl`` file).

The log is append-only and may be read while it is written or after a crash: a line that is not one
JSON object (the torn last line of a killed writer, a damaged one) is skipped and counted, never an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVENTS_FILE", "EventLog", "load_events"]

EVENTS_FILE = "events.jsonl"


@dataclass
class EventLog:
    path: str
    events: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0


def load_events(run: str | os.PathLike[str]) -> EventLog:
    """The events of run directory ``run`` in the order written.  Raises FileNotFoundError naming
    what is missing and why it may be missing."""
    run = os.fspath(run)
    if not os.path.exists(run):
        raise FileNotFoundError(f"{run}: no such run directory")
    path = os.path.join(run, EVENTS_FILE) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{run}: no event log ({EVENTS_FILE}) in this run directory; a CheckpointManager writes it "
            "as it trains (a run written by an older unbroken, or by unbroken.save alone, has none)")
    log = EventLog(path)
    with open(path, "rb") as f:
        for raw in f:
            try:
                event = json.loads(raw.decode("utf-8", errors="replace")) if raw.endswith(b"\n") else None
            except ValueError:
                event = None
            if isinstance(event, dict):
                log.events.append(event)
            elif raw.strip():
                log.skipped_lines += 1
    return log
