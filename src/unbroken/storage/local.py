"""Checkpoints in a local POSIX directory, committed with the durability recipe of docs/RELIABILITY.md.

Commit order (each step exists for a reason):
1. the staging directory is created next to its final name, so the final rename stays on one
   filesystem and is atomic;
2. every file is created exclusively, written fully and fsynced; a failed fsync fails the save and
   is never retried (after a failed fsync Linux may drop the dirty pages and a retry "succeeds");
3. the manifest goes to a temporary name, is fsynced and renamed, and the staging dir is fsynced;
4. the run directory is checked to still be the one this storage opened (same device and inode): after
   ``rm -rf run`` another job may own a new directory at that path, and no commit may land in it;
5. the staging dir is renamed to its final name (never replacing a committed one) and the parent is
   fsynced: the rename is atomic but only durable after the directory fsync.
Deletion renames to a trash name first, so a half-deleted checkpoint never looks committed.

The same identity check guards every other change to the run directory (a new staging area, a delete,
cleaning up leftovers), so a writer whose run directory was deleted or replaced stops with
:class:`RunDirectoryReplacedError` instead of saving into, or applying retention to, another job's run.
The check and the change are two system calls, not one atomic step; the window between them is a few
microseconds, against a deletion that happens once.  A run directory created here is made durable
(:func:`make_dirs_durably`), so a power cut after the first commit cannot lose its entry.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import stat
import uuid
import weakref

from .._internal import failpoints
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RunDirectoryReplacedError,
    StorageError,
)
from .base import ReadHandle, Staging, Storage, WriteHandle

__all__ = ["LocalStorage", "make_dirs_durably"]

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
_WRITE_BUFFER = 4 * 1024 * 1024
_TOKEN = re.compile(r"^[0-9a-f]{12}\Z")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(path: str) -> list[str]:
    """Create ``path`` and its missing parents, fsyncing the parent of each one created (a new entry is
    durable only once its directory is fsynced).  Returns those parents, outermost first."""
    path = os.path.abspath(path)
    missing: list[str] = []
    existing = path
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    if not missing and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    synced = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:  # created meanwhile (another rank), or not a directory: then that error
            if not os.path.isdir(directory):
                raise
        parent = os.path.dirname(directory)
        try:
            fsync_dir(parent)
        except PermissionError:  # a parent we may write but not read cannot be opened to fsync
            continue
        synced.append(parent)
    return synced


_RootIdentity = tuple[int, int]


def _identity(path: str) -> _RootIdentity | None:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_dev, info.st_ino


def _require_same_root(root: str, identity: _RootIdentity, action: str) -> None:
    """Refuse ``action`` if ``root`` is no longer the directory whose ``identity`` was taken when it
    was opened: after ``rm -rf`` it may be another job's run, whose checkpoints we must never touch."""
    if _identity(root) != identity:
        raise RunDirectoryReplacedError(
            f"{root}: the run directory was deleted or replaced since this process opened it (another job "
            f"may be using it now); refused to {action}: nothing was written into it or deleted from it. "
            "Fix: restart the job: it will lock the directory and resume from it as it is now")


class LocalWriteHandle(WriteHandle):
    """Coalesces small writes into one buffer; large ones go straight from tensor memory to the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        failpoints.hit("file.create")
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._pending = bytearray()

    def write(self, data: memoryview) -> None:
        self._require_open()
        if len(data) >= _WRITE_BUFFER:
            self._flush()
            self._write_all(data)
            return
        self._pending += data
        if len(self._pending) >= _WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._write_all(memoryview(self._pending))
            self._pending = bytearray()

    def _write_all(self, data: memoryview) -> None:
        fd = self._require_open()
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while len(data):
            failpoints.hit("file.write")
            written = os.write(fd, data)  # short writes happen (signals, pipes, some filesystems)
            data = data[written:]

    def _require_open(self) -> int:
        if self._fd is None:
            raise StorageError(f"{self.path}: write after close")
        return self._fd

    def close(self) -> None:
        self._flush()
        fd = self._require_open()
        self._fd = None
        try:
            failpoints.hit("file.fsync")
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalReadHandle(ReadHandle):
    def __init__(self, dir_fd: int, file_name: str, where: str) -> None:
        self.where = where
        # O_NOFOLLOW: a symlink could point outside the checkpoint; O_NONBLOCK: opening a FIFO must not hang.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self._fd = os.open(file_name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where}: file is missing") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptCheckpointError(f"{where}: is a symlink; refusing to follow it") from None
            raise
        info = os.fstat(self._fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self._fd)
            raise CorruptCheckpointError(f"{where}: is not a regular file")
        self.size = info.st_size

    def read_into(self, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise CorruptCheckpointError(f"{self.where}: truncated (short read at byte {offset + done})")
            done += got

    def map(self) -> memoryview | None:
        if self.size == 0:
            return None
        # ACCESS_COPY: a private mapping, so views are writable for torch but never write the file.
        mapped = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY)
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        return memoryview(mapped)

    def close(self) -> None:
        os.close(self._fd)


class LocalStaging(Staging):
    def __init__(self, root: str, identity: _RootIdentity, name: str, token: str | None = None) -> None:
        """A new staging directory, or (with ``token``) one another process created, joined.  ``identity``
        is the run directory's when the storage opened it: nothing is committed into another one."""
        _require_same_root(root, identity, f"begin saving {name}")
        self.root, self.name, self._identity = root, name, identity
        self.joined = token is not None
        self.token = uuid.uuid4().hex[:12] if token is None else token
        if not _TOKEN.match(self.token):
            raise ValueError(f"invalid staging token {self.token!r}")
        self.path = os.path.join(root, f"{STAGING_PREFIX}{name}-{self.token}")
        self._handles: list[LocalWriteHandle] = []
        if self.joined:
            if not os.path.isdir(self.path) or os.path.islink(self.path):
                raise StorageError(errno.ENOENT, f"{self.path}: the staging directory to join does not exist "
                                   "(is the run directory on a filesystem every rank shares?)")
            return
        os.mkdir(self.path)
        try:
            fsync_dir(root)
            failpoints.hit("staging.create")
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def create(self, file_name: str) -> WriteHandle:
        handle = LocalWriteHandle(os.path.join(self.path, file_name))
        self._handles.append(handle)
        return handle

    def commit(self, manifest: bytes) -> None:
        if self.joined:
            raise RuntimeError("a joined staging area is committed by the process that began it")
        final = os.path.join(self.root, self.name)
        # The staging area went with a deleted run directory: say so, rather than "no such file".
        _require_same_root(self.root, self._identity, f"commit {self.name}")
        failpoints.hit("manifest.write")
        tmp = LocalWriteHandle(os.path.join(self.path, "manifest.json.tmp"))
        tmp.write(memoryview(manifest))
        tmp.close()
        failpoints.hit("manifest.rename")
        os.rename(tmp.path, os.path.join(self.path, "manifest.json"))
        fsync_dir(self.path)
        if os.path.lexists(final):  # os.rename would silently replace an empty directory
            raise CheckpointExistsError(f"{final} already exists; a committed checkpoint is never overwritten")
        failpoints.hit("commit.rename")
        _require_same_root(self.root, self._identity, f"commit {self.name}")
        os.rename(self.path, final)
        try:
            failpoints.hit("commit.fsync")
            fsync_dir(self.root)
        except OSError:
            # Not known to be durable: undo, so a save that reports failure never leaves a checkpoint.
            self.path = os.path.join(self.root, f"{TRASH_PREFIX}{self.name}-{uuid.uuid4().hex[:12]}")
            os.rename(final, self.path)
            raise

    def abort(self) -> None:
        for handle in self._handles:
            handle.abort()
        if not self.joined:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for handle in self._handles:  # the area is the creator's to remove
            try:
                os.unlink(handle.path)
            except OSError:
                pass


class LocalStorage(Storage):
    shares_staging = True  # ranks on one shared filesystem write into one staging directory

    def __init__(self, root: str | os.PathLike[str], create: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root
        if create:
            make_dirs_durably(self.root)
        elif not os.path.isdir(self.root):
            raise CheckpointNotFoundError(f"{self.root}: no such directory")
        # Held open while this storage lives, it pins the directory's inode: a directory made at this
        # path after ``rm -rf`` cannot get the same inode number (ext4 and tmpfs reuse a freed one at once).
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, root_fd)
        info = os.fstat(root_fd)
        self._identity: _RootIdentity = (info.st_dev, info.st_ino)

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if not e.startswith((STAGING_PREFIX, TRASH_PREFIX)))

    def exists(self, name: str) -> bool:
        return os.path.lexists(os.path.join(self.root, name))

    def begin(self, name: str) -> Staging:
        return LocalStaging(self.root, self._identity, name)

    def join(self, name: str, token: str) -> Staging:
        return LocalStaging(self.root, self._identity, name, token)

    def open(self, name: str, file_name: str) -> ReadHandle:
        where = os.path.join(self.root, name, file_name)
        try:
            dir_fd = os.open(os.path.join(self.root, name), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{os.path.join(self.root, name)}: no such checkpoint") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptCheckpointError(f"{os.path.join(self.root, name)}: not a real directory") from None
            raise
        try:
            return LocalReadHandle(dir_fd, file_name, where)
        finally:
            os.close(dir_fd)

    def delete(self, name: str) -> None:
        trash = os.path.join(self.root, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
        _require_same_root(self.root, self._identity, f"delete {name}")
        try:
            failpoints.hit("delete.rename")
            os.rename(os.path.join(self.root, name), trash)
            fsync_dir(self.root)
            failpoints.hit("delete.remove")
            shutil.rmtree(trash)
        except OSError as exc:
            raise StorageError(exc.errno, f"could not delete checkpoint {name} in {self.root}: {exc.strerror}") from exc

    def quarantine(self, name: str, new_name: str) -> None:
        """One atomic rename inside the run directory, made durable by fsyncing it: interrupted, the
        checkpoint is either still ``name`` (and is quarantined again next time) or already ``new_name``."""
        _require_same_root(self.root, self._identity, f"quarantine {name}")
        try:
            os.rename(os.path.join(self.root, name), os.path.join(self.root, new_name))
            fsync_dir(self.root)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{os.path.join(self.root, name)}: no such checkpoint") from None
        except OSError as exc:
            raise StorageError(exc.errno, f"could not quarantine checkpoint {name} in {self.root}: "
                               f"{exc.strerror}") from exc

    def cleanup(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []  # nothing to clean, and nothing of another run to touch
        # Another job's run at this path has its own saves in flight, which are not our leftovers.
        _require_same_root(self.root, self._identity, "clean up staging leftovers")
        removed = []
        for entry in os.listdir(self.root):
            if not entry.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                continue
            path = os.path.join(self.root, entry)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(entry)
            except OSError:
                pass  # still there: it is never listed, and the next cleanup tries again
        return removed
