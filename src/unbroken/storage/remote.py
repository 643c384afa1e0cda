"""Checkpoints on object stores (S3, GCS, Azure, ``memory://``) through fsspec: no atomic rename needed.

Commit protocol (docs/OBJECT_STORAGE.md):
1. ``begin`` refuses a step whose ``manifest.json`` exists: a committed step is never overwritten;
2. each data object goes straight to ``<run>/step_N/<file>``: a small one in one PUT (retried whole
   with backoff), a large one through the store's multipart writer, which makes nothing visible
   until the upload completes and is aborted (its parts dropped) on failure;
3. ``commit`` checks again that no manifest exists, then creates ``manifest.json`` with a
   conditional create (S3 ``If-None-Match: *``) and reads it back: the manifest is the commit
   record, and it exists only once every data object is complete.
Deletion removes the manifest first, so a half-deleted checkpoint never looks committed.
``exists`` means committed (a manifest is present); ``names`` also lists uncommitted step directories.
fsspec and its store packages are imported lazily: the rest of unbroken works without them.

Several ranks save one step (``shares_staging``): rank 0 begins it, the others :meth:`~FsspecStorage.join`
it with rank 0's token and upload their own ``rankNNNNN.safetensors``; each checks its upload (a HEAD:
the object exists with exactly the bytes sent) before it reports; rank 0 creates the manifest once
every rank reported (unbroken.distributed.commit).  A failed save's objects are removed by the rank
that wrote them; a dead rank's are removed by :meth:`~FsspecStorage.cleanup` after the grace period.

Key layout (a decision): ``<run>/step_N/<file>``, the checkpoint layout of FORMAT.md everywhere
(local, bucket, ``unbroken cp``, ``aws s3 sync``), so a save by N ranks writes N objects under one
prefix: N PUTs, or per rank 2 + parts requests for a multipart upload, plus N HEADs (reads).  S3
serves about 3,500 writes/s per partitioned prefix and splits a busy prefix by key range; the rank
files differ right after ``step_N/rank``, so one save's writes can be split, but step numbers only
grow, so each save starts in the newest partition again.  A save issuing more writes per second than
that is throttled (503 SlowDown, retried by botocore with backoff) until S3 splits the prefix; a
larger ``block_size`` means fewer parts.  A spreading component before the step
(``<run>/<hash>/step_N/...``) would need a format change and is not done (docs/DISTRIBUTED.md "At scale").
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError, StorageError, UnbrokenError
from .base import STEP_NAME, ReadHandle, Staging, Storage
from .remote_files import MANIFEST, FsspecReadHandle, FsspecStaging

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = ["FsspecStorage", "MANIFEST", "display_url", "redacted"]

_GLOB = re.compile(r"[*?\[]")  # what fsspec's rm would expand as a pattern

log = logging.getLogger("unbroken")

MiB = 1024 * 1024
DEFAULT_BLOCK_SIZE = 64 * MiB  # multipart part size: 10,000 parts (S3's cap) hold 640 GB
_NAME = re.compile(r"^[A-Za-z0-9._-]+\Z")
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas")
# Exceptions of the transport stack: translated into StorageError; anything else (a bug) propagates.
_TRANSPORT_MODULES = frozenset({"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "fsspec",
                                "urllib3", "requests", "google", "azure", "ssl", "socket", "asyncio"})
# Failures of these leave the store as it was: their advice is about reaching and reading it, not saving.
_READ_ACTIONS = frozenset({"list", "look up", "look up the bucket of", "read"})
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oci"})  # URL = bucket/key
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "adl": "adlfs", "oci": "ocifs", "hf": "huggingface_hub"}


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment: what may appear in logs and messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


def redacted(options: Any) -> Any:
    """``options`` with every credential-like value replaced by ``'***'`` (for reprs and logs)."""
    if isinstance(options, dict):
        return {k: "***" if _is_secret_name(k) and v is not None else redacted(v) for k, v in options.items()}
    return options


def _is_secret_name(name: object) -> bool:
    return isinstance(name, str) and any(word in name.lower() for word in _SECRET_WORDS)


def _secret_values(options: Any) -> list[str]:
    found: list[str] = []
    if isinstance(options, dict):
        for k, v in options.items():
            if _is_secret_name(k) and isinstance(v, str) and len(v) >= 4:
                found.append(v)
            else:
                found.extend(_secret_values(v))
    return found


def is_transport_error(exc: BaseException) -> bool:
    """An I/O failure of the store (network, HTTP, permissions), as opposed to a bug in our code."""
    if isinstance(exc, UnbrokenError):
        return False
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES


def _filesystem(url: str, options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    protocol = urlsplit(url).scheme.lower()
    package = _PACKAGES.get(protocol, "the fsspec implementation of this protocol")
    try:
        import fsspec.core
    except ImportError:
        raise ImportError(f"{display_url(url)}: object storage needs fsspec and {package}: "
                          f"pip install 'unbroken[s3]' (or pip install fsspec {package})") from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        return fs, str(path)
    except ImportError as exc:
        raise ImportError(f"{display_url(url)}: fsspec has no implementation of {protocol}:// installed: "
                          f"pip install {package} ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{display_url(url)}: unknown storage protocol {protocol!r} ({exc})") from None


def _mtime(info: dict[str, Any]) -> float | None:
    """Last-modified time of an object listing entry as UNIX time; None where the store gives none."""
    for key in ("LastModified", "mtime", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class Missing(Exception):
    """Internal: the object or prefix does not exist (where that is an answer, not an error)."""


class FsspecStorage(Storage):
    """A run on any fsspec filesystem: ``FsspecStorage("s3://bucket/run", {"profile": "ml"})``.

    ``block_size``: multipart part size (S3 needs >= 5 MiB); objects smaller than it go in one PUT.
    ``cleanup_grace_s``: an uncommitted step directory younger than this is left alone by
    :meth:`cleanup` (it may be another process's save in progress).  ``upload_attempts``: how often a
    whole-object PUT is tried, with exponential backoff from ``retry_backoff_s``, on transient errors
    (on top of the store client's own per-request retries).  ``fetch_requests`` and ``fetched_bytes``
    count the ranged GETs of reads (a rank's restore: what it took from the store).
    """

    shares_staging = True  # the ranks of a job upload their objects into one step, rank 0 commits

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, create: bool = True,
                 block_size: int = DEFAULT_BLOCK_SIZE, cleanup_grace_s: float = 3600.0,
                 upload_attempts: int = 3, retry_backoff_s: float = 0.5) -> None:
        if block_size <= 0 or upload_attempts < 1 or cleanup_grace_s < 0 or retry_backoff_s < 0:
            raise ValueError("block_size and upload_attempts must be positive, cleanup_grace_s and "
                             "retry_backoff_s non-negative")
        self._options = dict(storage_options or {})
        self.url = display_url(str(url))
        self._secrets = _secret_values(self._options)
        self.block_size, self.cleanup_grace_s = block_size, cleanup_grace_s
        self.upload_attempts, self.retry_backoff_s = upload_attempts, retry_backoff_s
        self.clock: Callable[[], float] = time.time  # compared with the store's timestamps by cleanup()
        self.fetch_requests, self.fetched_bytes = 0, 0
        # Listings must never come from a cache: commit and cleanup decide on what exists right now.
        self.fs, root = _filesystem(str(url), {"use_listings_cache": False, **self._options})
        self.root = root.rstrip("/")
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        # S3 (s3fs) creates the manifest with If-None-Match: *; elsewhere a create is check-then-write.
        self.atomic_create = bool(protocols & {"s3", "s3a"}) and self._has_create_mode()
        self._bucketed = bool(protocols & _BUCKET_PROTOCOLS)
        if not create and not self._any_object(self.root):
            raise self._no_run()

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r}, storage_options={redacted(self._options)!r})"

    # -- paths and errors -------------------------------------------------------------------------
    def path(self, name: str, file_name: str | None = None) -> str:
        """The store path of a step directory or of one object in it (names are never paths)."""
        for part in (name, file_name):
            if part is not None and (not _NAME.match(part) or part in (".", "..")):
                raise CorruptCheckpointError(f"{self.url}: {part!r} is not a plain name; refusing a path")
        return f"{self.root}/{name}" if file_name is None else f"{self.root}/{name}/{file_name}"

    def where(self, name: str, file_name: str | None = None) -> str:
        return f"{self.url}/{name}" if file_name is None else f"{self.url}/{name}/{file_name}"

    def scrub(self, text: str) -> str:
        """``text`` with every credential value of the storage options blanked out."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def failures(self, action: str, where: str, missing: Callable[[], Exception] | None = None) -> Iterator[None]:
        """Translate store failures inside the block into our errors: ``missing()`` for a missing
        object (if given), else :class:`StorageError` naming ``where`` and a fix.  Errors that are not
        the store's (bugs) and our own errors pass through unchanged."""
        try:
            yield
        except FileNotFoundError as exc:
            if isinstance(exc, UnbrokenError):
                raise
            if missing is not None:
                raise missing() from None
            raise self.error(action, where, exc) from exc
        except FileExistsError:
            raise  # conditional creates report a lost race this way; the caller decides
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            raise self.error(action, where, exc) from exc

    def error(self, action: str, where: str, exc: BaseException) -> StorageError:
        reason = self.scrub(str(exc) or type(exc).__name__)
        if isinstance(exc, PermissionError):
            code, fix = errno.EACCES, ("check the credentials (environment, ~/.aws or the like, storage_options) "
                                       "and that they allow listing, reading, writing and deleting under "
                                       f"{self.url}")
        elif isinstance(exc, FileNotFoundError):
            code, fix = errno.ENOENT, f"check that the bucket of {self.url} exists (create it first) and the URL"
        elif action in _READ_ACTIONS:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            fix = (f"check the endpoint (storage_options client_kwargs.endpoint_url), the network, the credentials "
                   f"and that the bucket of {self.url} exists; a read changes nothing, so retrying is safe")
        else:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            fix = ("check the endpoint, the network and the store's status; retrying is safe: a failed "
                   "save leaves no committed checkpoint and earlier checkpoints are intact")
        return StorageError(code, f"{action} {where} failed: {reason}. Fix: {fix}")

    def _no_run(self) -> CheckpointNotFoundError:
        """Nothing under the run's URL: say whether its bucket is missing (one more request, on this
        error path only), since a wrong bucket, credentials or endpoint all look like an empty run."""
        bucket = self.root.lstrip("/").partition("/")[0]
        if self._bucketed and bucket and not self.is_bucket(bucket):
            return CheckpointNotFoundError(
                f"{self.url}: no such run: the bucket {bucket!r} does not exist at this endpoint or these "
                "credentials cannot see it. Fix: check the bucket name, the credentials and the endpoint "
                "(storage_options client_kwargs.endpoint_url)")
        return CheckpointNotFoundError(f"{self.url}: no such run (no objects under it). Fix: check the URL; "
                                       "the credentials and endpoint must be those of the store that holds it")

    def is_bucket(self, bucket: str) -> bool:
        try:
            with self.failures("look up the bucket of", self.url, missing=Missing):
                return bool(self.fs.exists(bucket))
        except Missing:
            return False

    # -- small operations -------------------------------------------------------------------------
    def _objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix`` (path -> listing entry); empty when there is none."""
        try:
            with self.failures("list", self.url, missing=Missing):
                found = self.fs.find(prefix, detail=True)
        except Missing:
            return {}
        return {p: info for p, info in found.items() if info.get("type", "file") == "file"}

    def _any_object(self, prefix: str) -> bool:
        """Whether anything exists under ``prefix`` (one listing request, not a full walk)."""
        try:
            with self.failures("list", self.url, missing=Missing):
                return bool(self.fs.ls(prefix))
        except Missing:
            return False

    def is_object(self, path: str, where: str) -> bool:
        try:
            with self.failures("look up", where, missing=Missing):
                return bool(self.fs.info(path).get("type") == "file")
        except Missing:
            return False

    def remove(self, paths: list[str], where: str) -> None:
        """Delete objects; one already gone is fine (S3 deletes are idempotent anyway).

        Several objects go in batches (``rm`` of a list: S3's DeleteObjects, 1,000 keys a request, instead
        of a request each).  A batch reports no failure of a single key, so their prefix is listed once
        afterwards, and what is still there is deleted one by one, which raises its failure."""
        if len(paths) > 1 and not any(_GLOB.search(p) for p in paths):  # rm globs these; ours are literal keys
            with contextlib.suppress(Missing), self.failures("delete", where, missing=Missing):
                self.fs.rm(list(paths))
            left = self._objects(posixpath.commonpath(paths))
            paths = [p for p in paths if p in left]
        for path in paths:
            with contextlib.suppress(Missing), self.failures("delete", where, missing=Missing):
                self.fs.rm_file(path)

    def put_whole(self, path: str, data: bytes, where: str, create: bool = False) -> None:
        """Upload one object in one request, retried with exponential backoff on transient failures
        (a PUT of the same bytes is idempotent).  ``create``: fail with FileExistsError if it exists."""
        for attempt in range(self.upload_attempts):
            try:
                with self.failures("upload", where):
                    self._put(path, data, create)
                return
            except StorageError as exc:
                permanent = isinstance(exc.__cause__, (PermissionError, FileNotFoundError))
                if permanent or attempt + 1 == self.upload_attempts:
                    raise
                delay = self.retry_backoff_s * 2 ** attempt
                log.warning("%s; retrying in %.2f s (attempt %d of %d)", exc.strerror, delay, attempt + 2,
                            self.upload_attempts)
                time.sleep(delay)

    def check_uploaded(self, path: str, size: int, where: str) -> None:
        """Raise unless the object at ``path`` exists with exactly ``size`` bytes (one HEAD).

        What an upload's success means here: the store acknowledged it (botocore sends a checksum of
        each PUT and part body, which S3 checks), and the object under its name is complete.  The ETag
        is no checksum of the content for multipart uploads, so it is not compared; the content is
        covered by the header and tensor CRC32Cs the writer computed, which go into the manifest and
        are checked on every read."""
        def missing() -> StorageError:
            return StorageError(errno.EIO, f"{where}: the store acknowledged the upload but has no such object. "
                                "Fix: check the store's consistency and retry the save")
        with self.failures("check the upload of", where, missing=missing):
            found = self.fs.info(path).get("size")
        if found != size:
            raise StorageError(errno.EIO, f"{where}: the store holds {found} bytes after the upload, but {size} "
                               "were sent. Fix: check the store (or a proxy in between) and retry the save")

    def _has_create_mode(self) -> bool:
        """Whether this filesystem's ``pipe_file`` takes ``mode="create"`` (recent fsspec and s3fs releases)."""
        try:
            return "mode" in inspect.signature(self.fs.pipe_file).parameters
        except (TypeError, ValueError):  # no introspectable signature
            return False

    def _put(self, path: str, data: bytes, create: bool) -> None:
        if not create:
            self.fs.pipe_file(path, data)
        elif self._has_create_mode():
            self.fs.pipe_file(path, data, mode="create")  # atomic on S3 (If-None-Match: *)
        elif self.fs.exists(path):  # no conditional create here: check-then-write, verified by the caller
            raise FileExistsError(errno.EEXIST, "object exists", path)
        else:
            self.fs.pipe_file(path, data)

    # -- the Storage interface --------------------------------------------------------------------
    def names(self) -> list[str]:
        try:
            with self.failures("list", self.url, missing=Missing):
                entries = self.fs.ls(self.root, detail=True)
        except Missing:
            return []
        dirs = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")
        return sorted(d for d in dirs if _NAME.match(d) and not d.startswith("."))

    def exists(self, name: str) -> bool:
        """Whether step ``name`` is committed (its manifest exists)."""
        return self.is_object(self.path(name, MANIFEST), self.where(name, MANIFEST))

    def begin(self, name: str) -> Staging:
        if self.exists(name):
            raise CheckpointExistsError(f"{self.where(name)} is committed; a committed checkpoint is never overwritten")
        return FsspecStaging(self, name)

    def join(self, name: str, token: str) -> Staging:
        """Step ``name`` that another process began (its staging ``token``), to upload objects into."""
        self.path(name)  # a plain name, or CorruptCheckpointError
        return FsspecStaging(self, name, token)

    def open(self, name: str, file_name: str) -> ReadHandle:
        path, where = self.path(name, file_name), self.where(name, file_name)
        try:
            return FsspecReadHandle(self, path, where)
        except CorruptCheckpointError:
            if not self._any_object(self.path(name)):
                raise CheckpointNotFoundError(f"{self.where(name)}: no such checkpoint") from None
            raise

    def delete(self, name: str) -> None:
        objects = sorted(self._objects(self.path(name)))
        if not objects:
            raise CheckpointNotFoundError(f"{self.where(name)}: no such checkpoint")
        manifest = self.path(name, MANIFEST)
        if manifest in objects:  # first: from here on the checkpoint no longer looks committed
            self.remove([manifest], self.where(name, MANIFEST))
        self.remove([p for p in objects if p != manifest], self.where(name))

    def quarantine(self, name: str, new_name: str) -> None:
        """Object stores cannot rename: every object is copied (server-side) to ``new_name``, then the
        checkpoint is deleted manifest first.  Interrupted, it leaves the checkpoint as it was, possibly
        with a partial copy under ``new_name`` (listed as quarantined); the next attempt starts afresh."""
        source = self.path(name)
        objects = sorted(self._objects(source))
        if self.path(name, MANIFEST) not in objects:
            raise CheckpointNotFoundError(f"{self.where(name)}: no such committed checkpoint")
        for path in objects:
            target = self.path(new_name) + path[len(source):]
            with self.failures("copy", self.where(name)):
                self.fs.copy(path, target)
        self.delete(name)

    def cleanup(self) -> list[str]:
        """Remove step directories without a manifest whose newest object is older than the grace
        period (a younger one may be a concurrent save in progress), and stale multipart uploads."""
        cutoff = self.clock() - self.cleanup_grace_s
        removed = []
        for name in self.names():
            if STEP_NAME.match(name) is None or self.exists(name):
                continue
            objects = self._objects(self.path(name))
            times = [_mtime(info) for info in objects.values()]
            if not objects or any(t is None or t > cutoff for t in times):
                continue  # too young, or undatable: never removed on a guess
            try:
                self.remove(sorted(objects), self.where(name))
                removed.append(name)
            except (StorageError, CheckpointNotFoundError) as exc:
                log.warning("cleanup: %s stays for now: %s", self.where(name), exc)
        return removed + abort_stale_uploads(self, cutoff)


def abort_stale_uploads(storage: FsspecStorage, cutoff: float) -> list[str]:
    """Abort incomplete S3 multipart uploads under the run started before ``cutoff`` (a killed
    process leaves them; S3 bills their parts until they are aborted).  Other stores: nothing.
    One listing page (up to 1,000 uploads) per call: later calls get the rest."""
    call = getattr(storage.fs, "call_s3", None)
    split = getattr(storage.fs, "split_path", None)
    if call is None or split is None:
        return []
    bucket, prefix, _ = split(storage.root + "/")
    with storage.failures("list multipart uploads of", storage.url):
        uploads = call("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
    aborted = []
    for upload in uploads:
        relative = upload["Key"][len(prefix):]
        initiated = _mtime({"LastModified": upload.get("Initiated")})
        if STEP_NAME.match(relative.split("/", 1)[0]) is None or initiated is None or initiated > cutoff:
            continue  # not ours (a shared bucket), undatable, or maybe a save in progress
        try:
            with storage.failures("abort the multipart upload of", f"{storage.url}/{relative}"):
                call("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(f"{relative} (incomplete upload)")
        except StorageError as exc:
            log.warning("cleanup: %s", exc)
    return aborted
