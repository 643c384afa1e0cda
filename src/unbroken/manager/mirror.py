"""The second tier: committed local checkpoints copied to a remote run (a bucket) in the background.

Invariants:
* training never waits for an upload, and an upload failure never touches the local checkpoint:
  it is logged, retried with backoff, and superseded by the next commit;
* only the newest committed checkpoint is worth uploading: a commit that arrives while another
  upload runs replaces any waiting one (the remote keeps the newest, not a backlog);
* remote retention runs after each successful upload, on the remote's own records;
* the checkpoint being uploaded is reported (``busy``), so local retention leaves it alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .._internal.warn import warn
from ..checkpoint.listing import scan
from ..checkpoint.transfer import copy_checkpoint
from ..errors import CheckpointSkippedWarning, UnbrokenError
from ..storage import Storage, step_name
from .retention import RetentionPolicy, expired

__all__ = ["Mirror"]

log = logging.getLogger("unbroken")

MAX_ATTEMPTS = 5


class Mirror:
    def __init__(self, local: Storage, remote: Storage, policies: list[RetentionPolicy],
                 backoff: float = 2.0, on_uploaded: Callable[[str], None] | None = None) -> None:
        self.local, self.remote, self.policies, self.backoff = local, remote, policies, backoff
        self._on_uploaded = on_uploaded
        self._cond = threading.Condition()
        self._wanted: str | None = None
        self._busy: str | None = None
        self._in_callback = False
        self._closed = False
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="unbroken-mirror", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> str | None:
        """The checkpoint being uploaded now (local retention must not delete it)."""
        return self._busy

    def submit(self, name: str) -> None:
        """Upload ``name`` (committed locally) when the uploader is free; replaces a waiting one."""
        with self._cond:
            self._wanted = name
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or uploading; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._wanted is not None or self._busy is not None or self._in_callback:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, wait: bool = True) -> None:
        if wait:
            self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=None if wait else 0)

    def fetch(self, step: int | None = None) -> str | None:
        """Download the checkpoint to restore from when the remote has a newer one than the local
        run (or, with ``step``, that step when the local run lacks it): a restart on a new machine.
        Tries older remote steps when one fails to download or verify; the name fetched, or None."""
        local_valid = {r.step for r in scan(self.local) if r.valid}
        if step is not None and step in local_valid:
            return None
        floor = max(local_valid, default=-1)
        remote_steps = sorted((r.step for r in scan(self.remote) if r.valid), reverse=True)
        wanted = [s for s in remote_steps if (s == step if step is not None else s > floor)]
        for candidate in wanted:
            name = step_name(candidate)
            try:
                result = copy_checkpoint(self.remote, self.local, name, verify_source=False)
            except (OSError, UnbrokenError) as exc:
                message = f"mirror: could not download {self.remote.url}/{name}: {exc}; trying an older one"
                warn(message, CheckpointSkippedWarning)
                continue
            log.info("mirror: downloaded %s from %s (%.1f MB in %.1f s)", name, self.remote.url,
                     result.bytes / 1e6, result.seconds)
            return name
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._wanted is None and not self._closed:
                    self._cond.wait()
                if self._wanted is None:
                    return
                name, self._wanted, self._busy = self._wanted, None, self._wanted
            try:
                self._upload_with_retries(name)
            finally:
                with self._cond:
                    self._busy, self._in_callback = None, self._on_uploaded is not None
            try:
                if self._on_uploaded is not None:  # after busy is cleared: the uploaded one may go now
                    self._on_uploaded(name)
            finally:
                with self._cond:
                    self._in_callback = False
                    self._cond.notify_all()

    def _upload_with_retries(self, name: str) -> None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                self._upload(name)
                self.last_error = None
                return
            except (OSError, UnbrokenError) as exc:  # a failed upload costs the remote copy, never the run
                self.last_error = exc
                newer = self._wanted is not None
                final = attempt == MAX_ATTEMPTS or newer or self._closed
                log.warning("mirror: upload of %s to %s failed (attempt %d): %s; the local checkpoint is kept%s",
                            name, self.remote.url, attempt, exc,
                            "" if final else f"; retrying in {self.backoff * 2 ** (attempt - 1):.0f} s")
                if final:
                    return
                with self._cond:
                    self._cond.wait_for(lambda: self._wanted is not None or self._closed,
                                        timeout=self.backoff * 2 ** (attempt - 1))

    def _upload(self, name: str) -> None:
        if not self.local.exists(name):  # deleted locally since (retention): a newer one follows
            return
        result = copy_checkpoint(self.local, self.remote, name)
        if result.copied:
            log.info("mirror: uploaded %s to %s (%.1f MB in %.1f s, %.0f MB/s)", name, self.remote.url,
                     result.bytes / 1e6, result.seconds, result.mb_per_s)
        self._apply_retention()

    def _apply_retention(self) -> None:
        if not self.policies:
            return
        for record in expired(scan(self.remote), self.policies):
            try:
                self.remote.delete(step_name(record.step))
                log.info("mirror: retention deleted step %d from %s", record.step, self.remote.url)
            except OSError as exc:
                log.warning("mirror: could not delete step %d from %s: %s", record.step, self.remote.url, exc)
