"""The coordinator's half of a save by several ranks: the ranks' reports become one manifest.

Each rank reports what it wrote (its file's size and header CRC, each tensor's entry), its per-rank
state and its pieces of sharded tensors.  The coordinator commits only a complete, consistent
checkpoint: every rank succeeded, the ranks agree on the shared state's layout, every replicated
tensor was written exactly once and the pieces of every sharded tensor add up to the whole.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..errors import StorageError
from ..format import FileEntry, Manifest, ShardedTensor, ShardEntry, TensorEntry
from .rankplan import RankPlan

__all__ = ["report_of", "failure_report", "assemble", "SaveRefused", "refused"]


class SaveRefused(StorageError):
    """The coordinator refused to commit: a rank failed, or the ranks' reports do not fit together."""


def refused(message: str, errno: int | None = None) -> SaveRefused:
    return SaveRefused(errno, message) if errno else SaveRefused(message)


def report_of(plan: RankPlan, file_entry: FileEntry, entries: dict[str, TensorEntry]) -> dict[str, Any]:
    return {
        "ok": True, "rank": plan.rank,
        "file": {"name": plan.file_name, "size": file_entry.size, "header_crc32c": file_entry.header_crc32c},
        "tensors": {n: [e.dtype, list(e.shape), e.begin, e.end, e.crc32c, e.block_bytes, list(e.block_crc32c)]
                    for n, e in entries.items()},
        "digest": plan.digest(), "layout": plan.layout, "rank_state": plan.rank_state, "sharded": plan.sharded,
    }


def failure_report(rank: int, exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "rank": rank, "error": f"{type(exc).__name__}: {exc}",
            "errno": exc.errno if isinstance(exc, OSError) else None}


def assemble(base: Manifest, plan: RankPlan, reports: list[dict[str, Any]]) -> Manifest:
    """The manifest of a complete save (coordinator), or :class:`SaveRefused` saying what is wrong."""
    failed = [r for r in reports if not r.get("ok")]
    if failed:
        first = failed[0]
        ranks = ", ".join(str(r["rank"]) for r in failed)
        raise refused(f"rank {first['rank']} failed to write its file: "
                          f"{first['error']}" + (f" (ranks failing: {ranks})" if len(failed) > 1 else ""),
                      first.get("errno"))
    _check_layouts(plan, reports)
    files: dict[str, FileEntry] = {}
    tensors: dict[str, TensorEntry] = {}
    for report in reports:
        file = report["file"]
        if file["name"] in files:
            raise refused(f"internal error: two ranks reported the file {file['name']!r}")
        files[file["name"]] = FileEntry(file["size"], file["header_crc32c"])
        for name, (dtype, shape, begin, end, crc, block_bytes, blocks) in report["tensors"].items():
            if name in tensors:
                raise refused(f"internal error: tensor {name!r} was written by two ranks")
            tensors[name] = TensorEntry(file["name"], dtype, tuple(shape), begin, end, crc, block_bytes,
                                        tuple(blocks))
    missing = [name for name, _, _, role in plan.layout if role != "sharded" and name not in tensors]
    if missing:
        raise refused(f"internal error: replicated tensors written by no rank: {missing[:5]}")
    return replace(base, world_size=len(reports), state=plan.shared, rank_state=[r["rank_state"] for r in reports],
                   files=files, tensors=tensors, sharded=_sharded(reports))


def _check_layouts(plan: RankPlan, reports: list[dict[str, Any]]) -> None:
    mine = plan.digest()
    for report in reports:
        if report["digest"] == mine:
            continue
        ours = {n: (d, s, r) for n, d, s, r in plan.layout}
        theirs = {n: (d, s, r) for n, d, s, r in report["layout"]}
        diff = sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))
        detail = (f"tensors that differ (dtype, shape, sharding, or parameter vs buffer): {diff[:5]}" if diff
                  else "the models'/optimizers' settings or keys differ")
        raise refused(f"rank {report['rank']}'s model/optimizer state does not match rank 0's ({detail}). "
                          "Modules and optimizers are saved once for all ranks: they must be replicated (DDP) "
                          "or DTensor-sharded (FSDP2) on every rank")


def _sharded(reports: list[dict[str, Any]]) -> dict[str, ShardedTensor]:
    layouts: dict[str, dict[str, Any]] = {}
    pieces: dict[str, list[ShardEntry]] = {}
    for report in reports:
        for name, info in report["sharded"].items():
            layouts.setdefault(name, info)
            shard = info.get("shard")
            if shard is not None:
                pieces.setdefault(name, []).append(
                    ShardEntry(shard["tensor"], tuple(shard["offsets"]), tuple(shard["shape"])))
    result = {}
    for name, info in layouts.items():
        shards = tuple(pieces.get(name, []))
        if sum(math.prod(s.shape) for s in shards) != math.prod(info["shape"]):
            raise refused(f"internal error: the saved pieces of {name!r} do not add up to its shape "
                              f"{info['shape']}")
        result[name] = ShardedTensor(info["dtype"], tuple(info["shape"]), shards, tuple(info["placements"]),
                                     tuple(info["mesh"]))
    return result
