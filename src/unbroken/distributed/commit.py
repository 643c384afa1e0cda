"""The commit protocol of one checkpoint saved by several ranks (docs/RELIABILITY.md).

1. rank 0 begins the staging area and broadcasts its token (or its failure to begin one);
2. every other rank joins that area; every rank writes and fsyncs its own file (on object storage:
   uploads it and checks with a HEAD that the object holds exactly the bytes sent), catching its own
   failure;
3. every rank's report (its file and tensor entries, or its error) is gathered on rank 0;
4. rank 0 commits only when every rank succeeded and the reports fit together (the manifest last,
   then the atomic rename and the parent fsync of docs/RELIABILITY.md; on object storage the
   manifest's conditional create is the commit); otherwise it removes the staging area (on object
   storage: its own objects; each other rank removes its own in step 5);
5. rank 0 broadcasts the outcome: every rank returns once the checkpoint is committed, or raises
   the same error naming the failing rank.

Every rank issues the same collectives whatever fails locally, so a local failure never
desynchronises the group.  A rank that dies or hangs makes the others' collectives fail within the
group's timeout (:class:`~unbroken.DistributedError`); rank 0 then removes
the staging area, and whatever is left behind by a dead rank 0 is cleaned by the next restore (on
object storage every surviving rank removes its own objects, and what a dead rank uploaded, or its
unfinished multipart upload, is removed by ``Storage.cleanup`` once the grace period has passed).
Rank 0 verifies no object itself: each rank checked its own upload, so the commit costs rank 0 no
request per rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import StorageError
from ..format import FileEntry, Manifest
from ..format.manifest import unreadable
from ..io.plan import FilePlan, Run
from ..io.writer import write_tensor_file
from ..storage import Staging, Storage, WriteHandle
from .assemble import SaveRefused, assemble, failure_report, refused, report_of
from .nodes import NodeGroup
from .rankplan import BLOCK_BYTES, RankPlan
from .world import World

__all__ = ["save_by_ranks"]


@dataclass
class _Local:
    """This rank's own failure, if any (reported, then chained to the error every rank raises)."""

    error: BaseException | None = None


def save_by_ranks(world: World, storage: Storage, name: str, step: int, plan: RankPlan, file_plan: FilePlan,
                  runs: Iterable[Run], base: Manifest, node: NodeGroup | None = None) -> Manifest:
    """Run the protocol on this rank; the committed manifest, or an error on every rank.

    With ``node`` (node-local run directories, :mod:`.nodes`) each node's leader begins and commits
    that node's copy (its ranks' files and the one manifest, which rank 0 assembles and broadcasts):
    see :func:`_commit_on_nodes`."""
    local = _Local()
    staging: Staging | None = None
    committed: Manifest | None = None
    try:
        if node is None:
            staging = _open_staging(world, storage, name, step, local)
        else:
            staging = _open_node_staging(world, node, storage, name, step, local)
        report = _write_file(plan, staging, file_plan, runs, local)
        reports = world.saving.gather_json(report)
        outcome = None
        if reports is not None and staging is not None:  # rank 0
            deferred = _Deferred(staging) if node is not None else staging
            outcome, committed = _decide(base, plan, deferred, reports)
            if node is not None and outcome["ok"]:
                outcome["manifest"] = deferred.manifest.decode("utf-8") if isinstance(deferred, _Deferred) else ""
        outcome = world.saving.broadcast_json(outcome)
        if node is not None and outcome["ok"] and staging is not None:
            outcome = _commit_on_nodes(world, node, storage, staging, name, outcome, local)
    except BaseException:
        if staging is not None:
            staging.abort()
        raise
    if not outcome["ok"]:
        if staging is not None:
            staging.abort()  # rank 0 has removed the area; a joiner removes the file it made
        raise _failed(f"saving step {step} to {storage.url} failed: {outcome['error']}. Nothing was committed; "
                      "earlier checkpoints are intact", outcome.get("errno")) from local.error
    if committed is not None:
        return committed
    files = {n: FileEntry(size, crc) for n, (size, crc) in outcome["files"].items()}
    return replace(base, world_size=world.size, files=files, tensors={})


def _failed(message: str, errno: int | None) -> StorageError:
    """The error every rank raises (with the failing rank's errno, e.g. ENOSPC, where it had one)."""
    return StorageError(errno, message) if errno else StorageError(message)


def _begin(storage: Storage, name: str, local: _Local) -> tuple[Staging | None, dict[str, Any]]:
    """Begin a staging area: it and its token to hand to the joiners, or the failure to report."""
    try:
        staging = storage.begin(name)
    except Exception as exc:
        local.error = exc
        return None, {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
    return staging, {"token": staging.token}


def _open_staging(world: World, storage: Storage, name: str, step: int, local: _Local) -> Staging | None:
    """Rank 0 begins the area, the others join it; None on a rank that could not join."""
    staging, opened = _begin(storage, name, local) if world.is_coordinator else (None, None)
    try:
        opened = world.saving.broadcast_json(opened)
    except BaseException:
        if staging is not None:  # not yet handed to the caller, which aborts it after this point
            staging.abort()
        raise
    if "error" in opened:
        raise _failed(f"saving step {step} to {storage.url} failed: rank 0 could not create the staging area: "
                      f"{opened['error']}", opened.get("errno")) from local.error
    if world.is_coordinator:
        return staging
    try:
        return storage.join(name, opened["token"])
    except Exception as exc:
        local.error = exc
        return None


class _Deferred(Staging):
    """Rank 0's area under node-local directories: the commit keeps the manifest for every node's leader."""

    def __init__(self, staging: Staging) -> None:
        self._staging, self.name, self.token, self.manifest = staging, staging.name, staging.token, b""

    def create(self, file_name: str) -> WriteHandle:
        return self._staging.create(file_name)

    def commit(self, manifest: bytes) -> None:
        self.manifest = manifest

    def abort(self) -> None:
        self._staging.abort()


def _open_node_staging(world: World, node: NodeGroup, storage: Storage, name: str, step: int, local: _Local
                       ) -> Staging | None:
    """Each node's leader begins its node's area; rank 0 hands every node its leader's token (a gather
    of the leaders' tokens and one broadcast of one token per node); the other ranks join theirs."""
    staging, opened = _begin(storage, name, local) if node.is_leader else (None, None)
    try:
        gathered = world.saving.gather_json(opened)
        tokens: dict[str, Any] | None = None
        if gathered is not None:
            failed = [(rank, o) for rank, o in enumerate(gathered) if o is not None and "error" in o]
            tokens = ({"error": f"rank {failed[0][0]}: {failed[0][1]['error']}", "errno": failed[0][1]["errno"]}
                      if failed else {str(rank): o["token"] for rank, o in enumerate(gathered) if o is not None})
        tokens = world.saving.broadcast_json(tokens)
    except BaseException:
        if staging is not None:
            staging.abort()
        raise
    if "error" in tokens:
        if staging is not None:
            staging.abort()
        raise _failed(f"saving step {step} to the node-local directories failed: a node could not create its staging "
                      f"area: {tokens['error']}", tokens.get("errno")) from local.error
    if node.is_leader:
        return staging
    try:
        return storage.join(name, tokens[str(node.leader)])
    except Exception as exc:
        local.error = exc
        return None


def _commit_on_nodes(world: World, node: NodeGroup, storage: Storage, staging: Staging, name: str,
                     outcome: dict[str, Any], local: _Local) -> dict[str, Any]:
    """Every node's leader commits the manifest rank 0 assembled; the save succeeds only when every
    node committed (gathered on rank 0, then broadcast).  Otherwise the leaders that committed delete
    their copy again, so that no node keeps a step the others lack."""
    error = None
    if node.is_leader:
        try:
            staging.commit(outcome["manifest"].encode("utf-8"))
        except Exception as exc:
            local.error = exc
            error = {"error": f"rank {world.rank} could not commit its node's copy: {type(exc).__name__}: {exc}",
                     "errno": getattr(exc, "errno", None)}
    reports = world.saving.gather_json(error)
    final: dict[str, Any] | None = None
    if reports is not None:
        failed = [r for r in reports if r is not None]
        final = {"ok": False, **failed[0]} if failed else {"ok": True, "files": outcome["files"]}
    final = world.saving.broadcast_json(final)
    if not final["ok"] and node.is_leader and error is None:
        try:
            storage.delete(name)
        except OSError as exc:  # restore skips a step missing on some node; cleanup is not needed for that
            local.error = local.error or exc
    return final


def _write_file(plan: RankPlan, staging: Staging | None, file_plan: FilePlan, runs: Iterable[Run],
                local: _Local) -> dict[str, Any]:
    if staging is None:
        return failure_report(plan.rank, local.error or RuntimeError("no staging area"))
    try:
        file_entry, entries = write_tensor_file(staging.create(plan.file_name), plan.file_name, file_plan, runs,
                                                BLOCK_BYTES)
    except Exception as exc:
        local.error = exc
        return failure_report(plan.rank, exc)
    return report_of(plan, file_entry, entries)


def _decide(base: Manifest, plan: RankPlan, staging: Staging, reports: list[dict[str, Any]]
            ) -> tuple[dict[str, Any], Manifest | None]:
    """Rank 0: commit a complete, consistent checkpoint, or remove the staging area."""
    try:
        manifest = assemble(base, plan, reports)
        raw = manifest.to_json()
        problem = unreadable(raw)  # readers refuse it: a commit would leave a checkpoint nothing can load
        if problem is not None:
            raise refused(problem)
        staging.commit(raw)
    except Exception as exc:
        staging.abort()
        if isinstance(exc, SaveRefused):
            message = exc.strerror or str(exc)
        else:
            message = f"rank 0 could not commit: {type(exc).__name__}: {exc}"
        return {"ok": False, "error": message, "errno": getattr(exc, "errno", None)}, None
    files = {n: [f.size, f.header_crc32c] for n, f in manifest.files.items()}
    return {"ok": True, "files": files}, manifest
