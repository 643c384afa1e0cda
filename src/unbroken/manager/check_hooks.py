"""What a manager does for ``unbroken check`` (and any harness that proves a resume exact), driven by
the environment of the training process, so that the user's script runs unchanged:

``UNBROKEN_RUN_DIR=<dir>``
    Replaces the run directory given in code (a warning is logged saying so).  Every manager of the
    process uses it: meant for scripts with one manager.
``UNBROKEN_KILL_AT=<step>``
    ``step(<step>)`` SIGKILLs the process before returning.  When a save is in flight at that step
    (started by it, or still being written), the kill falls at a random durable point of that save
    (a file created, a write, an fsync, the manifest, the commit rename: the points of
    ``unbroken._internal.failpoints``), drawn by ``UNBROKEN_KILL_SEED`` (default 0) among the points
    the previous save passed; if the save commits first, the process is killed right after it.
``UNBROKEN_CHECK_LOG=<file>``
    Appends JSON lines: ``restore`` (the step restored, 0 for a fresh start), ``step`` (the metrics
    passed to ``step()`` and a fingerprint of each RNG stream at that call), ``save`` (the RNG
    fingerprints and whether parameters held gradients no optimizer step applied yet), ``seed`` (a
    call of ``torch.manual_seed``/``random.seed``/``numpy.random.seed``... between a restore and the
    first step after it, with its caller's file and line), ``kill``.
``UNBROKEN_CHECK_STEPS=<n>``
    After ``step(<n>)`` the manager closes (saving step n) and the process exits with status 0.

Unset, none of this costs anything: :meth:`CheckHooks.from_environment` returns None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .._internal import failpoints
from ..state.rng import capture_rng

__all__ = ["CheckHooks", "run_directory", "rng_fingerprint", "ENV_RUN_DIR", "ENV_KILL_AT", "ENV_KILL_SEED",
           "ENV_CHECK_LOG", "ENV_CHECK_STEPS"]

log = logging.getLogger("unbroken")

ENV_RUN_DIR = "UNBROKEN_RUN_DIR"
ENV_KILL_AT = "UNBROKEN_KILL_AT"
ENV_KILL_SEED = "UNBROKEN_KILL_SEED"
ENV_CHECK_LOG = "UNBROKEN_CHECK_LOG"
ENV_CHECK_STEPS = "UNBROKEN_CHECK_STEPS"

_DEFAULT_SAVE_POINTS = 16  # a guess for the first save: the window of a save not seen yet
_SEEDERS = (("torch", "manual_seed"), ("torch", "seed"), ("torch.random", "manual_seed"), ("torch.random", "seed"),
            ("torch.cuda", "manual_seed"), ("torch.cuda", "manual_seed_all"), ("random", "seed"),
            ("numpy.random", "seed"))


def run_directory(directory: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``directory``, or ``UNBROKEN_RUN_DIR`` when set (with a log line saying so)."""
    override = os.environ.get(ENV_RUN_DIR)
    if not override:
        return directory
    log.warning("run directory %s replaced by %s (%s is set)", os.fspath(directory), override, ENV_RUN_DIR)
    return override


def rng_fingerprint() -> dict[str, str]:
    """A short hash of each global RNG stream (python, numpy, torch, cuda)."""
    return {name: _digest(value) for name, value in capture_rng().items()}


def _digest(value: Any) -> str:
    h = hashlib.blake2b(digest_size=8)
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, (tuple, list)):
        for item in value:
            _feed(h, item)
    elif hasattr(value, "tobytes"):  # numpy arrays
        h.update(value.tobytes())
    elif hasattr(value, "numpy"):  # torch tensors (uint8 generator states)
        h.update(value.numpy().tobytes())
    else:
        h.update(repr(value).encode())


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    if not text.strip().isdigit():
        raise ValueError(f"{name}={text!r}: expected a non-negative integer (a step)")
    return int(text)


class CheckHooks:
    """The environment's requests for one process (see the module docstring)."""

    def __init__(self, log_path: str | None, kill_at: int | None, kill_seed: int, end_at: int | None) -> None:
        self.log_path, self.kill_at, self.end_at = log_path, kill_at, end_at
        self._random = random.Random(kill_seed)
        self._write_lock = threading.Lock()
        self._points: _PointCounter | None = None
        self._save_starts: list[int] = []  # the point count at each save's start
        self._seed_patches: list[tuple[Any, str, Any]] = []
        self._restored_step = 0
        self._inside_seeding = False
        if kill_at is not None:
            self._points = _PointCounter(failpoints._ARMED, self._killed_in_save)
            failpoints._ARMED = self._points

    @classmethod
    def from_environment(cls) -> CheckHooks | None:
        """The hooks the environment asks for; None when it asks for none."""
        log_path = os.environ.get(ENV_CHECK_LOG) or None
        kill_at, end_at = _env_int(ENV_KILL_AT), _env_int(ENV_CHECK_STEPS)
        if log_path is None and kill_at is None and end_at is None:
            return None
        return cls(log_path, kill_at, _env_int(ENV_KILL_SEED) or 0, end_at)

    # -- events of the manager ----------------------------------------------------------------------
    def restored(self, step: int) -> None:
        self._restored_step = step
        self._record({"event": "restore", "step": step, "rng": rng_fingerprint()})
        if step > 0 and self.log_path is not None:
            self._watch_seeding()

    def before_step(self, step: int) -> None:
        self._unwatch_seeding()  # only the calls between restore() and the first step after it matter
        if step == self.kill_at and self._points is not None:
            points = self._save_window()
            self._points.kill_at = self._points.seen + self._random.randint(1, points)

    def after_step(self, step: int, metrics: dict[str, Any], saving: Callable[[], bool]) -> bool:
        """Log the step; kill the process at ``UNBROKEN_KILL_AT``; True when ``UNBROKEN_CHECK_STEPS``
        says the run ends here."""
        self._record({"event": "step", "step": step, "metrics": {str(k): _plain(v) for k, v in metrics.items()},
                      "rng": rng_fingerprint()})
        if step == self.kill_at:
            in_flight = saving()
            while saving():  # the save's own durable points kill the process; else it ends, then we do
                time.sleep(0.002)
            self._kill({"event": "kill", "step": step, "during_save": in_flight, "point": None})
        return self.end_at is not None and step >= self.end_at

    def saving(self, step: int, grads_pending: bool) -> None:
        if self._points is not None:
            self._save_starts.append(self._points.seen)
        if self.log_path is not None:
            self._record({"event": "save", "step": step, "rng": rng_fingerprint(),
                          "grads_pending": grads_pending})

    # -- the kill -----------------------------------------------------------------------------------
    def _save_window(self) -> int:
        """How many durable points a save passes: the last complete save's count (with its retention)."""
        starts, seen = self._save_starts, self._points.seen if self._points is not None else 0
        if len(starts) >= 2:
            return max(1, starts[-1] - starts[-2])
        if starts and seen > starts[-1]:
            return seen - starts[-1]
        return _DEFAULT_SAVE_POINTS

    def _killed_in_save(self, point: str) -> None:
        self._kill({"event": "kill", "step": self.kill_at, "during_save": True, "point": point})

    def _kill(self, record: dict[str, Any]) -> None:
        self._record(record)
        os.kill(os.getpid(), signal.SIGKILL)

    # -- seeding after restore ----------------------------------------------------------------------
    def _watch_seeding(self) -> None:
        for module_name, attr in _SEEDERS:
            module = sys.modules.get(module_name)
            original = getattr(module, attr, None) if module is not None else None
            if callable(original):
                self._seed_patches.append((module, attr, original))
                setattr(module, attr, self._seeding(f"{module_name}.{attr}", original))

    def _unwatch_seeding(self) -> None:
        while self._seed_patches:
            module, attr, original = self._seed_patches.pop()
            setattr(module, attr, original)

    def _seeding(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def seeding(*args: Any, **kwargs: Any) -> Any:
            if self._inside_seeding:  # torch.manual_seed seeds CUDA through torch.cuda.manual_seed_all: one call
                return original(*args, **kwargs)
            self._inside_seeding = True
            try:
                self._record_seeding(name, args, kwargs)
                return original(*args, **kwargs)
            finally:
                self._inside_seeding = False
        return seeding

    def _record_seeding(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        frame = sys._getframe(2)
        while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in (
                "torch", "numpy", "random"):
            frame = frame.f_back
        arguments = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        where = f"{_shown_path(frame.f_code.co_filename)}:{frame.f_lineno} ({frame.f_code.co_name})"
        self._record({"event": "seed", "call": f"{name}({arguments})", "after_restore": self._restored_step,
                      "where": where})

    def _record(self, record: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._write_lock, open(self.log_path, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()


class _PointCounter(failpoints._Armed):
    """Counts the durable points passed (delegating to a fault armed otherwise); past ``kill_at``
    points, calls ``on_kill``."""

    def __init__(self, inner: failpoints._Armed | None, on_kill: Callable[[str], None]) -> None:
        super().__init__(None, None)
        self.inner, self.on_kill = inner, on_kill
        self.kill_at: int | None = None

    def hit(self, point: str) -> None:
        with self.lock:
            self.seen += 1
            due = self.kill_at is not None and self.seen >= self.kill_at
        if due:
            self.on_kill(point)
        if self.inner is not None:
            self.inner.hit(point)


def _shown_path(path: str) -> str:
    """``path`` relative to the current directory when inside it: the script as the user named it."""
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return path if relative.startswith("..") else relative


def _plain(value: Any) -> Any:
    """A metric as JSON: numbers exactly (floats round-trip through JSON), tensors by their item."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "numel", lambda: 1)() == 1:
        value = item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return repr(value)
