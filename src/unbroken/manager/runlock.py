"""One writer per run directory: an advisory lock held by a CheckpointManager for its lifetime.

A zombie job and its restart, or a job launched twice, would otherwise both save into one run and
apply retention to each other's checkpoints.  The lock is a POSIX record lock (``lockf``) on
``<run>/.lock``: the kernel releases it when the holder dies in any way (SIGKILL, OOM kill), so a
crashed run never leaves a stale lock behind.  A POSIX lock belongs to the process and is not
inherited by ``fork``: DataLoader workers that outlive a killed trainer for a few seconds do not keep
the run locked (an ``flock`` would be held by them).  It also works on NFS.
The file's content (pid, host, time) is informational, for the error message.

Inside one process (a notebook re-running its set-up cell), a new manager takes the run over from
the earlier one: that one finishes its save in flight and is closed, with a warning.  Across
processes there is no takeover: the second writer gets :class:`RunLockedError`.

The lock file lives in the run directory, so ``rm -rf run`` takes the lock with it: a job started
afterwards locks a new ``.lock`` in a new directory and is rightly not refused.  What must stop then is
the old writer, and the lock is not where that happens: ``LocalStorage`` checks, before every change it
makes (a new save, the commit rename, a delete, a cleanup), that its path still names the directory it
opened, and raises :class:`~unbroken.errors.RunDirectoryReplacedError` otherwise.  That check also
covers ``lock=False`` runs; re-checking the lock file's identity here would repeat it for locked runs
only, so the lock is taken once and never re-validated.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from .._internal.warn import warn
from ..errors import RunLockedError, StorageError
from ..storage import LocalStorage, Storage

__all__ = ["RunLock", "LOCK_NAME", "run_locked"]

LOCK_NAME = ".lock"
_POLL_SECONDS = 0.05

# Locks held by this process, by path: a second manager here takes over instead of failing.
_HELD: dict[str, RunLock] = {}
_HELD_GUARD = threading.Lock()


class RunLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, directory: str, on_takeover: Callable[[], object] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        """``on_takeover`` is called when a later lock in this process takes the run over; it must
        stop writing (finish the save in flight) before returning.  ``clock`` and ``sleep`` time the
        wait for a live holder (tests pass fake ones)."""
        self.path = os.path.join(os.path.realpath(directory), LOCK_NAME)
        # Weak: the registry of held locks must not keep an abandoned manager alive.
        self._on_takeover = weakref.WeakMethod(on_takeover) if on_takeover is not None else None
        self._fd: int | None = None
        self._clock, self._sleep = clock, sleep

    def acquire(self, timeout: float = 0.0, take_over: bool = True) -> None:
        """Take the lock, waiting up to ``timeout`` seconds for a live holder to exit.  A holder in this
        process is taken over (``take_over``) or makes it fail like one in another process."""
        self._take_over_in_process(take_over)
        fd = self._open()
        deadline = self._clock() + timeout
        try:
            while not _try_lock(fd):
                if self._clock() >= deadline:
                    raise RunLockedError(self._busy_message(fd, timeout))
                self._sleep(_POLL_SECONDS)
            _write_owner(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        with _HELD_GUARD:
            _HELD[self.path] = self

    def release(self) -> None:
        with _HELD_GUARD:
            if _HELD.get(self.path) is self:
                del _HELD[self.path]
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the record lock (the only descriptor of the file we open)

    def _take_over_in_process(self, take_over: bool) -> None:
        with _HELD_GUARD:
            earlier = _HELD.get(self.path)
        if earlier is None or earlier is self:
            return
        if not take_over:
            raise RunLockedError(f"{os.path.dirname(self.path)} is in use by a CheckpointManager in this process; "
                                 "close() it first")
        warn(f"{os.path.dirname(self.path)} was held by an earlier CheckpointManager in this process; "
             "it finishes its save in flight and is closed now (call close() on a manager you replace "
             "to avoid this warning)", RuntimeWarning)
        callback = earlier._on_takeover() if earlier._on_takeover is not None else None
        if callback is not None:
            callback()
        earlier.release()

    def _open(self) -> int:
        try:
            # O_NOFOLLOW: a planted symlink must not make us truncate a file elsewhere.
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            fix = ("it is a symlink, which is never followed; remove it" if exc.errno == errno.ELOOP else
                   "make the run directory writable, or pass lock=False on filesystems without locks")
            raise StorageError(exc.errno, f"cannot open the run lock {self.path}: {exc.strerror}. Fix: {fix}") from exc

    def _busy_message(self, fd: int, timeout: float) -> str:
        owner = _read_owner(fd)
        waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
        return (f"{os.path.dirname(self.path)} is in use by another CheckpointManager ({owner}){waited}. Two "
                "writers on one run directory would race on its checkpoints and retention. Fix: stop the other "
                "process, use another run directory, or pass lock_timeout=SECONDS to wait for a predecessor "
                "that is still shutting down")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise StorageError(exc.errno, f"locking the run directory failed: {exc.strerror}. Fix: pass lock=False "
                           "on a filesystem without file locks (and make sure only one job writes there)") from exc


def _write_owner(fd: int) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    data = json.dumps(owner).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # a full disk: the lock itself holds, only the holder's description is missing
        pass


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["since"])))
        return f"pid {int(owner['pid'])} on {str(owner['host'])[:100]} since {since}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"


@contextlib.contextmanager
def run_locked(storage: Storage, busy: str | None = None) -> Iterator[None]:
    """Hold a local run's lock for the duration of a maintenance operation (prune, quarantine,
    import; object stores have no lock): :class:`RunLockedError` while a manager writes there, never
    a takeover.  ``busy``, when given, replaces the advice of that error (it names the operation)."""
    lock = RunLock(storage.root) if isinstance(storage, LocalStorage) else None
    if lock is not None:
        try:
            lock.acquire(0.0, take_over=False)
        except RunLockedError:
            if busy is None:
                raise
            raise RunLockedError(f"{os.path.dirname(lock.path)} is in use by a CheckpointManager (its holder is "
                                 f"named in {lock.path}); {busy}") from None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
