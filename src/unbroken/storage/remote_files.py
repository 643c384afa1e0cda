"""Objects of one step on an object store: uploads, ranged reads, and the staging that commits them.

A data object is never visible half-written: a small one is one PUT, a large one a multipart upload
that becomes visible only when completed, and is aborted (parts dropped) when the save fails.  Once
uploaded, an object is looked up (one HEAD) and must hold exactly the bytes sent.  The step counts as
committed once its manifest exists; the manifest is created last, conditionally.

Several processes (the ranks of one job) write one step together: the process that began it hands
its ``token`` to the others, which :meth:`FsspecStorage.join` it and upload their own objects into
the same step prefix; only the beginner commits.  An object store has no staging directory to
rename, so the "staging area" is the step prefix itself, invisible to readers until the manifest.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

from .._internal import failpoints
from ..errors import CheckpointExistsError, CorruptCheckpointError, StorageError
from .base import MANIFEST_FILE, ReadHandle, Staging, WriteHandle

if TYPE_CHECKING:
    from .remote import FsspecStorage

__all__ = ["FsspecStaging", "FsspecWriteHandle", "FsspecReadHandle", "MANIFEST"]

log = logging.getLogger("unbroken")

MANIFEST = MANIFEST_FILE
MiB = 1024 * 1024
READ_CHUNK = 16 * MiB  # one ranged GET; a large read has READ_PARALLEL of them in flight
READ_PARALLEL = 8
# Reads that go on where the previous one ended get a read-ahead window that starts here (the first
# read of an object, its length prefix, gets this much: the header follows) and doubles up to
# READ_CHUNK: a reader going front to back costs few GETs.  A read elsewhere fetches exactly its
# bytes: a rank reading scattered ranges (its piece of each tensor) takes no more than those.
READ_AHEAD = 64 * 1024
_TOKEN = re.compile(r"^[0-9a-f]{12}\Z")


def _byte_view(data: memoryview) -> memoryview:
    return data.cast("B") if data.format != "B" or data.ndim != 1 else data


def read_range(storage: FsspecStorage, path: str, start: int, end: int, where: str) -> list[bytes]:
    """Bytes [start, end) of an object as consecutive chunks, several ranged GETs in flight."""
    starts = list(range(start, end, READ_CHUNK))
    ends = [min(s + READ_CHUNK, end) for s in starts]
    missing = lambda: CorruptCheckpointError(f"{where}: object is missing")  # noqa: E731
    storage.fetch_requests += len(starts)
    storage.fetched_bytes += end - start
    with storage.failures("read", where, missing=missing):
        if len(starts) == 1:
            return [storage.fs.cat_file(path, start=start, end=end)]
        chunks: list[bytes] = []
        for i in range(0, len(starts), READ_PARALLEL):
            got = storage.fs.cat_ranges([path] * len(starts[i:i + READ_PARALLEL]), starts[i:i + READ_PARALLEL],
                                     ends[i:i + READ_PARALLEL], on_error="return")
            for piece in got:
                if isinstance(piece, BaseException):
                    raise piece
                chunks.append(piece)
        return chunks



class FsspecWriteHandle(WriteHandle):
    """An object being uploaded.  Below ``block_size`` the bytes are buffered and PUT whole by
    :meth:`close`; from ``block_size`` on they stream through the store's multipart writer in parts of
    ``block_size``.  On S3 (and other multipart stores) nothing is visible under the object's name
    before :meth:`close` returns; ``memory://`` shows it as it grows, which is harmless because only
    the manifest commits a step."""

    def __init__(self, storage: FsspecStorage, path: str, where: str) -> None:
        self._storage, self.path, self.where = storage, path, where
        self._pending = bytearray()
        self._file: Any = None
        self._finished = False
        self._sent = 0  # bytes handed to write(): the size the object must have once uploaded

    @property
    def finished(self) -> bool:
        """Closed (the object is complete) or aborted."""
        return self._finished

    def write(self, data: memoryview) -> None:
        if self._finished:
            raise StorageError(f"{self.where}: write after close")
        view = _byte_view(data)
        self._sent += len(view)
        if self._file is None and len(self._pending) + len(view) < self._storage.block_size:
            self._pending += view
            return
        if self._file is None:
            with self._storage.failures("start the upload of", self.where):
                self._file = self._storage.fs.open(self.path, "wb", block_size=self._storage.block_size)
            pending, self._pending = self._pending, bytearray()
            self._stream(memoryview(pending))
        self._stream(view)

    def _stream(self, view: memoryview) -> None:
        step = self._storage.block_size  # slices bound the writer's buffer to about one part
        for start in range(0, len(view), step):
            before = self._file.tell()
            with self._storage.failures("upload", self.where):
                self._file.write(view[start:start + step])
            if self._file.tell() // step > before // step:  # the writer flushed: a part was sent
                failpoints.hit("object.part")

    def close(self) -> None:
        if self._finished:
            raise StorageError(f"{self.where}: closed twice")
        failpoints.hit("object.put")
        if self._file is None:
            self._storage.put_whole(self.path, bytes(self._pending), self.where)
        else:
            with self._storage.failures("complete the upload of", self.where):
                self._file.close()
        self._finished, self._pending, self._file = True, bytearray(), None
        self._storage.check_uploaded(self.path, self._sent, self.where)

    def abort(self) -> None:
        """Discard an unfinished upload: an S3 multipart upload is aborted, so no part is kept."""
        self._finished, self._pending = True, bytearray()
        file, self._file = self._file, None
        if file is None:
            return
        try:
            with self._storage.failures("abort the upload of", self.where):
                file.discard()
        except StorageError as exc:  # an abort must not hide the error that caused it
            log.warning("%s; cleanup() or a bucket lifecycle rule removes the incomplete upload", exc)
        finally:
            _never_commit(file)

    def __del__(self) -> None:
        # Dropped without close() or abort(): the fsspec file must not complete a partial upload when
        # it is collected.  No network here; cleanup() or a lifecycle rule aborts the upload later.
        if getattr(self, "_file", None) is not None:
            _never_commit(self._file)


def _never_commit(file: Any) -> None:
    """fsspec files complete their upload when closed or garbage collected: mark this one closed."""
    from fsspec.spec import AbstractBufferedFile

    if isinstance(file, AbstractBufferedFile):
        file.closed = True


class FsspecReadHandle(ReadHandle):
    """Ranged reads of one object.  A read that goes on where the previous one ended fetches a
    read-ahead window and serves the following reads from it: a reader going front to back (length
    prefix, header, small tensors) saves a round trip per read.  The window starts at ``READ_AHEAD``
    and doubles up to ``READ_CHUNK`` while reads stay sequential; a read elsewhere fetches exactly
    its own bytes, so a rank that reads only its ranges of a large object fetches only those (and
    the first ``READ_AHEAD`` bytes, for the length prefix and header)."""

    def __init__(self, storage: FsspecStorage, path: str, where: str) -> None:
        self._storage, self.path, self.where = storage, path, where
        with storage.failures("look up", where, missing=lambda: CorruptCheckpointError(f"{where}: object is missing")):
            info = storage.fs.info(path)
        if info.get("type") != "file":
            raise CorruptCheckpointError(f"{where}: is not an object")
        self.size = int(info["size"])
        self._window: bytes | bytearray = b""
        self._window_at = 0
        self._ahead = READ_AHEAD // 2  # doubled by the first read, at 0: "sequential" from the start
        self._next = 0  # where the previous read ended: a read starting there goes on sequentially

    def read_into(self, offset: int, buffer: memoryview) -> None:
        view = _byte_view(buffer)
        end = offset + len(view)
        if offset < 0 or end > self.size:
            at = min(max(offset, 0), self.size)
            raise CorruptCheckpointError(f"{self.where}: truncated (short read at byte {at})")
        if not len(view):
            return
        sequential, self._next = offset == self._next, end
        if not self._window_at <= offset or end > self._window_at + len(self._window):
            self._ahead = min(2 * self._ahead, READ_CHUNK) if sequential else READ_AHEAD // 2
            if not sequential or len(view) >= self._ahead:
                self._fetch(offset, view)
                return
            window = bytearray(min(self.size, offset + self._ahead) - offset)
            self._window, self._window_at = b"", offset  # never half-filled: a failed fetch leaves none
            self._fetch(offset, memoryview(window))
            self._window = window
        start = offset - self._window_at
        view[:] = memoryview(self._window)[start:start + len(view)]

    def _fetch(self, offset: int, view: memoryview) -> None:
        done = 0
        for chunk in read_range(self._storage, self.path, offset, offset + len(view), self.where) if len(view) else []:
            if done + len(chunk) > len(view) or len(chunk) == 0:
                raise CorruptCheckpointError(f"{self.where}: object changed while being read (at byte {offset + done})")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        if done != len(view):  # the object shrank after it was opened
            raise CorruptCheckpointError(f"{self.where}: truncated (short read at byte {offset + done})")

    def close(self) -> None:
        self._window = b""  # every read is a self-contained request: nothing else to release


class FsspecStaging(Staging):
    """Step ``name`` being written in place: its objects go straight to their final names, and it
    counts as committed only once :meth:`commit` has created the manifest.

    With ``token`` it is a step another process began (:meth:`FsspecStorage.join`): this process
    uploads its own objects there and never commits; its :meth:`abort` removes only those objects.
    Nothing marks a begun step in the store (no request until the first object), so the token names
    the save in messages and binds the joiners to the coordinator's step, but proves nothing to them.
    """

    def __init__(self, storage: FsspecStorage, name: str, token: str | None = None) -> None:
        self._storage, self.name = storage, name
        self.joined = token is not None
        self.token = uuid.uuid4().hex[:12] if token is None else token
        if not _TOKEN.match(self.token):
            raise ValueError(f"invalid staging token {self.token!r}")
        self._written: list[str] = []
        self._handles: list[FsspecWriteHandle] = []
        self._committed = False

    def create(self, file_name: str) -> WriteHandle:
        if file_name == MANIFEST:
            raise ValueError(f"{MANIFEST} is written by commit(), never as a data object")
        path = self._storage.path(self.name, file_name)
        # A writer that committed since begin(): never write into it.  A joiner skips the HEAD: the
        # beginner checked at begin() and checks again before its conditional create, and N ranks
        # asking for one key at once is what a store throttles.
        if not self.joined and self._storage.exists(self.name):
            raise CheckpointExistsError(f"{self._storage.where(self.name)} was committed meanwhile; not overwritten")
        self._written.append(path)  # before any byte is sent: abort() must know every object it may leave
        handle = FsspecWriteHandle(self._storage, path, self._storage.where(self.name, file_name))
        self._handles.append(handle)
        return handle

    def commit(self, manifest: bytes) -> None:
        if self.joined:
            raise RuntimeError("a joined staging area is committed by the process that began it")
        storage, where = self._storage, self._storage.where(self.name, MANIFEST)
        if any(not h.finished for h in self._handles):
            raise StorageError(f"{storage.where(self.name)}: commit with an upload still open; close every file first")
        if storage.exists(self.name):
            raise CheckpointExistsError(f"{storage.where(self.name)} is committed; a committed checkpoint is never "
                                        "overwritten")
        path = storage.path(self.name, MANIFEST)
        try:
            storage.put_whole(path, manifest, where, create=True)
            verified = storage.atomic_create  # the store refused to replace an existing manifest
        except FileExistsError:
            verified = False  # ours, from an attempt whose reply was lost, or another writer's
        if not verified:  # check-then-write stores, or a lost race: what is there now decides
            with storage.failures("verify", where):
                found = storage.fs.cat_file(path)
            if found != manifest:
                raise CheckpointExistsError(f"{storage.where(self.name)} was committed by another writer; "
                                            "not overwritten")
        self._committed = True

    def abort(self) -> None:
        """Delete every object this staging wrote, unless the step is committed (by us or by another
        writer): then nothing is touched.  Failures are logged, never raised; cleanup() retries."""
        for handle in self._handles:
            handle.abort()
        if self._committed or not self._written:
            return
        storage = self._storage
        try:
            if storage.exists(self.name):
                log.warning("%s is committed; abort leaves it untouched", storage.where(self.name))
                return
            storage.remove(self._written, storage.where(self.name))
        except StorageError as exc:  # an abort must not hide the error that caused it
            log.warning("%s; cleanup() removes them after its grace period", exc)
