"""The tail of a child's stderr: passed through live, its last lines kept for a report."""

from __future__ import annotations

import collections
import os
import sys
import threading

__all__ = ["StderrTail"]

_MAX_PARTIAL = 64 * 1024    # bytes of an unterminated stderr line kept for the report


class StderrTail:
    """Copies the child's stderr through to ours as it arrives and keeps its last lines for the report.

    Reads raw chunks rather than lines so that progress bars (``\\r`` without ``\\n``) stay live.
    """

    def __init__(self, fd: int, keep: int) -> None:
        self._fd = fd
        self._keep = keep
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._partial = b""
        self._echo = True
        self._thread = threading.Thread(target=self._pump, name="unbroken-run-stderr", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def lines(self) -> list[str]:
        if self._keep == 0:
            return []
        tail = list(self._lines)
        if self._partial:
            tail.append(_line_text(self._partial))
        return tail[-self._keep:]

    def _pump(self) -> None:
        try:
            while chunk := os.read(self._fd, 65536):
                self._echo_chunk(chunk)
                self._remember(chunk)
        finally:
            os.close(self._fd)

    def _echo_chunk(self, chunk: bytes) -> None:
        if not self._echo:
            return
        try:
            buffer = getattr(sys.stderr, "buffer", None)
            if buffer is not None:
                buffer.write(chunk)
                buffer.flush()
            else:
                sys.stderr.write(chunk.decode("utf-8", "replace"))
                sys.stderr.flush()
        except (OSError, ValueError):
            # Our stderr is gone (closed terminal, broken pipe).  Keep draining the pipe regardless:
            # a child blocked on a full stderr pipe would look like a hang.
            self._echo = False

    def _remember(self, chunk: bytes) -> None:
        *complete, rest = (self._partial + chunk).split(b"\n")
        self._lines.extend(_line_text(line) for line in complete)
        self._partial = rest[-_MAX_PARTIAL:]


def _line_text(line: bytes) -> str:
    # Of a progress bar's "\r"-separated redraws, the last one is what a terminal shows.
    parts = [p for p in line.decode("utf-8", "replace").split("\r") if p.strip()]
    return parts[-1].rstrip() if parts else ""
