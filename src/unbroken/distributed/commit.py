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
from ..io.plan import FilePlan, Run
from ..io.writer import write_tensor_file
from ..storage import Staging, Storage
from .assemble import SaveRefused, assemble, failure_report, report_of
from .rankplan import BLOCK_BYTES, RankPlan
from .world import World

__all__ = ["save_by_ranks"]


@dataclass
class _Local:
    """This rank's own failure, if any (reported, then chained to the error every rank raises)."""

    error: BaseException | None = None


def save_by_ranks(world: World, storage: Storage, name: str, step: int, plan: RankPlan, file_plan: FilePlan,
                  runs: Iterable[Run], base: Manifest) -> Manifest:
    """Run the protocol on this rank; the committed manifest, or an error on every rank."""
    local = _Local()
    staging: Staging | None = None
    committed: Manifest | None = None
    try:
        staging = _open_staging(world, storage, name, step, local)
        report = _write_file(plan, staging, file_plan, runs, local)
        reports = world.saving.gather_json(report)
        outcome = None
        if reports is not None and staging is not None:  # rank 0
            outcome, committed = _decide(base, plan, staging, reports)
        outcome = world.saving.broadcast_json(outcome)
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


def _open_staging(world: World, storage: Storage, name: str, step: int, local: _Local) -> Staging | None:
    """Rank 0 begins the area, the others join it; None on a rank that could not join."""
    opened: dict[str, Any] | None = None
    staging: Staging | None = None
    if world.is_coordinator:
        try:
            staging = storage.begin(name)
            opened = {"token": staging.token}
        except Exception as exc:
            local.error = exc
            opened = {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
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
        staging.commit(manifest.to_json())
    except Exception as exc:
        staging.abort()
        if isinstance(exc, SaveRefused):
            message = exc.strerror or str(exc)
        else:
            message = f"rank 0 could not commit: {type(exc).__name__}: {exc}"
        return {"ok": False, "error": message, "errno": getattr(exc, "errno", None)}, None
    files = {n: [f.size, f.header_crc32c] for n, f in manifest.files.items()}
    return {"ok": True, "files": files}, manifest
