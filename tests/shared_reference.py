"""Uninterrupted reference runs, run once per test session and shared by its xdist workers.

A bit-exactness test compares a resumed run with an uninterrupted one.  Every test of a module that
lands on a worker used to need its own copy of that reference (a module-scoped fixture is per
worker), so each worker ran the same deterministic training subprocess again.  ``shared_run`` runs
it once: the first worker to need it runs it while holding a file lock and saves a JSON record next
to the run's directory; the others wait for the lock and read the record (and the run's files,
which nobody writes after the record exists).  Without xdist the same code runs under the
session's own temporary directory, so a record is still made once.

The record is found by a digest of ``key``, which must hold everything that determines the run
(script, arguments, environment: ``session_environment()``); two runs with equal keys are the same
run, which is what makes reading another worker's result sound.  Each test module keeps its own check that the
reference is reproducible (its killed runs' steps equal the reference's, or an explicit second
uninterrupted run), so a shared reference proves no less than a per-worker one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock


def _session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory every process of this session can see: under xdist the parent of each worker's
    base temp (``pytest-N/``, the controller's), else this process's own base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def session_environment() -> dict[str, str]:
    """This process's environment less pytest's own variables (``PYTEST_XDIST_WORKER``,
    ``PYTEST_CURRENT_TEST``, ...), which differ between workers and tests but change nothing a run
    computes: the environment part of a key."""
    return {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, key: Mapping[str, Any],
               produce: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """The reference ``name`` identified by ``key``: ``(workdir, record)``.

    ``produce(workdir)`` runs it in the empty directory ``workdir`` and returns its JSON-serialisable
    record; it is called at most once per session for each ``(name, key)`` unless it raises (then the
    next test that needs it runs it again and reports its own failure).  ``workdir`` stays in place for
    the session; tests read its files and must not write there.
    """
    digest = hashlib.sha256(json.dumps([name, key], sort_keys=True).encode()).hexdigest()[:16]
    shared = _session_dir(tmp_path_factory)
    workdir, record = shared / f"reference-{name}-{digest}", shared / f"reference-{name}-{digest}.json"
    with FileLock(f"{record}.lock"):
        if not record.is_file():
            shutil.rmtree(workdir, ignore_errors=True)  # what a failed attempt left behind
            workdir.mkdir()
            written = record.with_suffix(".partial")
            written.write_text(json.dumps(produce(workdir)))
            written.replace(record)
        return workdir, json.loads(record.read_text())
