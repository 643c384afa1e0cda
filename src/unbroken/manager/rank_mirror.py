"""Two tiers across ranks: node-local run directories, and one copy of each checkpoint in a bucket.

Each node's directory holds its ranks' files of every checkpoint and the one manifest
(:func:`unbroken.distributed.commit.save_by_ranks` with a node group).  After each local commit every
rank uploads its own file to the mirror in the background, and rank 0 creates the mirror's manifest
last, once every rank reported its upload complete and checked (the protocol of an ``s3://`` run,
docs/DISTRIBUTED.md).  The uploads talk on a gloo group of their own (a third one: two threads must
never share a group), so training's collectives never wait for them.

Invariants:
* the ranks take part in the same upload rounds in the same order: a round is entered by each rank
  for a checkpoint committed on every node (its commit's last broadcast comes after every node's
  commit), rank 0 names the step of the round, and a rank forgets any submission not newer than the
  last round's step, so a late notification never opens a round the others will not enter;
* the mirror's step is committed (its manifest created) only when every rank's upload succeeded;
  otherwise every rank removes what it uploaded, and a dead rank's objects go at ``cleanup()``;
* the newest committed checkpoint supersedes a waiting one, and a failed round is not retried (the
  next commit is uploaded instead): the mirror may lag the local tier, never show a partial step.

:class:`TieredStorage` is what the ranks restore from: the local manifest and files where this node
has them, the bucket for the rest (ranged reads), so a restart on new nodes with empty disks restores
from the bucket and a restart on the same nodes reads its own files locally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..distributed.collectives import Comm
from ..distributed.roles import file_name
from ..errors import CheckpointExistsError, CheckpointNotFoundError, UnbrokenError
from ..io import read_manifest_bytes
from ..storage import LocalStorage, ReadHandle, Staging, Storage, parse_step_name
from .mirror import Mirror
from .retention import RetentionPolicy

__all__ = ["RankMirror", "TieredStorage"]

log = logging.getLogger("unbroken")

CHUNK_BYTES = 8 * 1024 * 1024


class RankMirror(Mirror):
    """This rank's part of the mirror: uploads its own file of each checkpoint; rank 0 commits."""

    def __init__(self, comm: Comm, local: Storage, remote: Storage, policies: list[RetentionPolicy],
                 on_uploaded: Callable[[str], None] | None = None) -> None:
        self.comm = comm
        self._last_round = -1
        super().__init__(local, remote, policies if comm.rank == 0 else [], on_uploaded=on_uploaded)

    def submit(self, name: str) -> None:
        step = parse_step_name(name)
        with self._cond:
            if step is not None and step > self._last_round:  # else: uploaded (or superseded) already
                self._wanted = name
                self._cond.notify_all()

    def fetch(self, step: int | None = None) -> str | None:  # noqa: ARG002 (Mirror's signature)
        """Nothing to download: the ranks restore through :class:`TieredStorage`."""
        return None

    def _upload_with_retries(self, name: str) -> None:
        if self.comm.broken is not None:
            return  # the group failed in an earlier round: no rank uploads through it any more
        try:
            self._round(name)
            self.last_error = None
        except (OSError, UnbrokenError) as exc:  # the mirror lags; the local checkpoint is intact
            self.last_error = exc
            log.warning("mirror: %s was not committed to %s: %s; the local checkpoint is kept", name, self.remote.url,
                        exc)

    def _round(self, name: str) -> None:
        """One upload round (collective on the mirror's group): rank 0 names the step and begins it."""
        staging: Staging | None = None
        opened: dict[str, Any] | None = None
        if self.comm.rank == 0:
            try:
                staging = self.remote.begin(name)
                opened = {"name": name, "token": staging.token}
            except CheckpointExistsError:
                opened = {"name": name, "skip": True}
            except (OSError, UnbrokenError) as exc:
                opened = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        opened = self.comm.broadcast_json(opened)
        chosen = opened["name"]
        with self._cond:
            self._busy, self._last_round = chosen, max(self._last_round, _step(chosen))
            if self._wanted is None and _step(name) > self._last_round:
                self._wanted = name  # newer than rank 0's choice: the next round (rank 0 gets it too)
            if self._wanted is not None and _step(self._wanted) <= self._last_round:
                self._wanted = None
        if "skip" in opened:
            return
        if "error" in opened:
            raise UnbrokenError(f"rank 0 could not begin {chosen} in {self.remote.url}: {opened['error']}")
        try:
            report, staging = self._upload_mine(chosen, staging, opened["token"])
            reports = self.comm.gather_json(report)
            outcome = self._decide(chosen, staging, reports) if reports is not None else None
            outcome = self.comm.broadcast_json(outcome)
        except BaseException:  # a rank died (DistributedError): nothing is committed; ours go now
            if staging is not None:
                staging.abort()
            raise
        if outcome["ok"]:
            log.info("mirror: %s committed to %s by %d ranks", chosen, self.remote.url, self.comm.size)
            if self.comm.rank == 0:
                self._apply_retention()
            return
        if staging is not None and self.comm.rank != 0:
            staging.abort()  # rank 0 aborted its own in _decide
        raise UnbrokenError(f"uploading {chosen} to {self.remote.url} failed: {outcome['error']}")

    def _upload_mine(self, name: str, staging: Staging | None, token: str) -> tuple[Any, Staging | None]:
        """Upload this rank's file of ``name`` from the local copy; None, or the error as text."""
        mine = file_name(self.comm.rank)
        try:
            if staging is None:
                staging = self.remote.join(name, token)
            with self.local.open(name, mine) as source:
                writer = staging.create(mine)
                buffer = bytearray(CHUNK_BYTES)
                offset = 0
                while offset < source.size:
                    size = min(CHUNK_BYTES, source.size - offset)
                    source.read_into(offset, memoryview(buffer)[:size])
                    writer.write(memoryview(buffer)[:size])
                    offset += size
                writer.close()  # the upload's check: the object holds exactly the bytes sent
        except (OSError, UnbrokenError) as exc:
            return f"rank {self.comm.rank}: {type(exc).__name__}: {exc}", staging
        return None, staging

    def _decide(self, name: str, staging: Staging | None, reports: list[Any]) -> dict[str, Any]:
        """Rank 0: the manifest (the very bytes of the local copy's) last, once every rank uploaded."""
        failed = [r for r in reports if r is not None]
        try:
            if failed or staging is None:
                raise UnbrokenError(failed[0] if failed else "rank 0 has no upload")
            staging.commit(read_manifest_bytes(self.local, name))
        except (OSError, UnbrokenError) as exc:
            if staging is not None:
                staging.abort()
            return {"ok": False, "error": str(exc)}
        return {"ok": True}


class TieredStorage(Storage):
    """A read-only view of a checkpoint in two tiers: this node's directory first, then the bucket.

    A file is read locally when this node holds it (its own ranks' files), else from the bucket,
    but only for a step committed there: a file held only by another node's disk is *not found*, so
    the ranks skip that step together and restore an older one (never a mix of two saves: every
    byte is checked against the manifest's CRCs anyway)."""

    def __init__(self, local: LocalStorage, remote: Storage) -> None:
        self.local, self.remote = local, remote
        self.url = f"{local.url} (+ {remote.url})"
        self._in_remote: dict[str, bool] = {}

    def _remote_has(self, name: str) -> bool:
        if name not in self._in_remote:
            self._in_remote[name] = self.remote.exists(name)
        return self._in_remote[name]

    def names(self) -> list[str]:
        return sorted(set(self.local.names()) | set(self.remote.names()))

    def exists(self, name: str) -> bool:
        return self.local.exists(name) or self._remote_has(name)

    def begin(self, name: str) -> Staging:
        raise NotImplementedError("a tiered view is read-only: saves go to the local tier")

    def open(self, name: str, file_name: str) -> ReadHandle:
        # A local name appears only by its commit's rename: a step listed here is committed on this node.
        if self.local.exists(name) and os.path.isfile(os.path.join(self.local.root, name, file_name)):
            return self.local.open(name, file_name)
        if self._remote_has(name):
            return self.remote.open(name, file_name)
        raise CheckpointNotFoundError(f"{name}/{file_name} is neither on this node ({self.local.url}) nor committed "
                                      f"in {self.remote.url} (another node holds it; its upload was not committed)")

    def delete(self, name: str) -> None:
        raise NotImplementedError("a tiered view is read-only")

    def cleanup(self) -> list[str]:
        return self.local.cleanup() + [f"{self.remote.url}/{n}" for n in self.remote.cleanup()]


def _step(name: str) -> int:
    step = parse_step_name(name)
    return -1 if step is None else step
