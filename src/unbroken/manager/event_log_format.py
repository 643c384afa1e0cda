"""The event log's file format and its reader (docs/EVENTS.md is the schema); the writer is
:mod:`unbroken.manager.events`.

A local run's log is ``RUN/events.jsonl``; a URL run's is one object per session,
``RUN/events/<session>.jsonl`` (object stores cannot append).  The reader is forgiving by design, as
the log is telemetry that anyone can write: a line torn by a crash, a line that is not a JSON object,
and an event type this version does not know are skipped; unknown fields are kept.  Import-light (no
torch): ``unbroken report`` uses it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..storage import is_url
from ..storage.paths import open_run

__all__ = ["EVENTS_FILE", "EVENTS_DIR", "EVENT_TYPES", "SCHEMA_VERSION", "read_events", "parse_events"]

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"  # a local run's log
EVENTS_DIR = "events"          # a URL run's per-session logs: events/<session>.jsonl
EVENT_TYPES = frozenset({"start", "restore", "save", "save_failed", "retention", "quarantine", "stop", "metrics",
                         "close", "crash"})


def read_events(run: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The events of the run directory ``run`` (local or URL), oldest first; [] when it has none.

    Skipped: a line that is not a whole JSON object (torn by a crash: no final newline, or cut short),
    and events of a type this version does not know.  Unknown fields are kept."""
    if not is_url(run):
        path = os.path.join(os.fspath(run), EVENTS_FILE)
        try:
            with open(path, "rb") as handle:
                return parse_events(handle.read())
        except FileNotFoundError:
            return []
    storage: Any = open_run(run, storage_options)
    prefix = storage.path(EVENTS_DIR)
    with storage.failures("list", storage.where(EVENTS_DIR)):
        paths = sorted(p for p in storage.fs.find(prefix) if p.endswith(".jsonl")) if storage.fs.exists(prefix) else []
    sessions = []
    for path in paths:
        with storage.failures("read", path):
            sessions.append(parse_events(storage.fs.cat_file(path)))
    sessions.sort(key=lambda events: events[0]["t"] if events else 0.0)  # each session in its own order
    return [event for events in sessions for event in events]


def parse_events(data: bytes) -> list[dict[str, Any]]:
    """The known events in the bytes of a log (see :func:`read_events`)."""
    lines = data.split(b"\n")
    events = []
    for raw in lines[:-1]:  # the last piece has no newline: empty, or a line torn by a crash
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if (isinstance(event, dict) and event.get("event") in EVENT_TYPES
                and isinstance(event.get("t"), (int, float)) and not isinstance(event.get("t"), bool)):
            events.append(event)
    return events
