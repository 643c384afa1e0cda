"""N ranks as N threads of this process: a :class:`~unbroken.distributed.collectives.Comm` whose collectives
meet at a barrier instead of a gloo group, so the protocol's own code (save_by_ranks, restore_by_ranks, the
sources) runs for many ranks in a unit test, with no process launched."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from unbroken.distributed.collectives import Comm
from unbroken.distributed.world import World

T = TypeVar("T")

TIMEOUT_S = 30.0


class _Meeting:
    """Every rank puts a value, every rank sees them all (one round per collective)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        seen = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return seen


class ThreadComm(Comm):
    def __init__(self, meeting: _Meeting, rank: int) -> None:
        super().__init__(None, rank, meeting.size)
        self.meeting = meeting

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        return bytes(self.meeting.exchange(self.rank, data)[src] or b"")

    def broadcast_into(self, buffer: torch.Tensor, src: int = 0) -> None:
        seen = self.meeting.exchange(self.rank, buffer.clone() if self.rank == src else None)
        if self.rank != src:
            buffer.copy_(seen[src])

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return list(self.meeting.exchange(self.rank, data))

    def gather_bytes(self, data: bytes, dst: int = 0) -> list[bytes] | None:
        seen = self.meeting.exchange(self.rank, data)
        return list(seen) if self.rank == dst else None

    def any_true(self, flag: bool) -> bool:
        return any(self.meeting.exchange(self.rank, flag))

    def all_true_each(self, flags: list[bool]) -> list[bool]:
        seen = self.meeting.exchange(self.rank, list(flags))
        return [all(column) for column in zip(*seen, strict=True)]

    def first_true(self, flag: bool) -> int | None:
        seen = self.meeting.exchange(self.rank, flag)
        return next((rank for rank, f in enumerate(seen) if f), None)


def run_ranks(size: int, body: Callable[[World], T]) -> list[T | BaseException]:
    """``body(world)`` on ``size`` threads; each rank's result or the exception it raised."""
    saving, control = _Meeting(size), _Meeting(size)
    results: list[Any] = [None] * size

    def one(rank: int) -> None:
        world = World(rank, size, ThreadComm(saving, rank), ThreadComm(control, rank))
        try:
            results[rank] = body(world)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            # No abort of the barriers: the others may still be leaving the last collective, as real
            # ranks do after an error every rank raises.  A rank that really is missing times them out.
            results[rank] = exc

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def ok(results: list[T | BaseException]) -> list[T]:
    """The results, once no rank raised (else the first rank's exception, with its rank)."""
    failed = [(rank, r) for rank, r in enumerate(results) if isinstance(r, BaseException)]
    failed.sort(key=lambda item: isinstance(item[1], threading.BrokenBarrierError))  # the cause first
    for rank, result in failed:
            raise AssertionError(f"rank {rank} raised {type(result).__name__}: {result}") from result
    return results  # type: ignore[return-value]
