"""Collectives over bytes and JSON on a gloo group, with no pickle anywhere.

``torch.distributed``'s object collectives pickle; a checkpoint's coordination messages are JSON
encoded to UTF-8 and carried in uint8 tensors instead (lengths first, then the padded payloads).
A failed collective (a peer died, the group's timeout passed) raises :class:`~unbroken.DistributedError`;
after one, the group's message order is unknown, so the :class:`Comm` refuses further use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .._internal.gcpause import paused_gc
from ..errors import DistributedError

__all__ = ["Comm", "decode_all"]

T = TypeVar("T")


class Comm:
    """Byte and JSON collectives among ``size`` ranks on ``group`` (``size == 1``: no communication)."""

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size
        self.broken: str | None = None

    def _run(self, what: str, call: Callable[[], T]) -> T:
        if self.broken is not None:
            raise DistributedError(f"unbroken's process group failed earlier ({self.broken}); restart the job")
        try:
            return call()
        except Exception as exc:  # gloo raises RuntimeError / DistBackendError subclasses
            self.broken = f"{what}: {exc}"
            raise DistributedError(f"rank {self.rank}: {what} among {self.size} ranks failed: a rank died, hangs, or "
                                   "did not make the same call (every rank must call restore(), step(), save() and "
                                   f"close() of its manager): {exc}") from exc

    # -- bytes ------------------------------------------------------------------------------------
    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """``data`` of rank ``src``, on every rank."""
        if self.size == 1:
            return data or b""
        import torch.distributed as dist

        def call() -> bytes:
            length = torch.tensor([len(data or b"") if self.rank == src else 0], dtype=torch.int64)
            dist.broadcast(length, src=self._global(src), group=self.group)
            payload = (torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if self.rank == src and data
                       else torch.empty(int(length.item()), dtype=torch.uint8))
            if payload.numel():
                dist.broadcast(payload, src=self._global(src), group=self.group)
            return payload.numpy().tobytes()

        return self._run("broadcast", call)

    def broadcast_into(self, buffer: torch.Tensor, src: int = 0) -> None:
        """Broadcast a uint8 tensor whose size every rank already knows."""
        if self.size == 1 or buffer.numel() == 0:
            return
        import torch.distributed as dist

        self._run("broadcast", lambda: dist.broadcast(buffer, src=self._global(src), group=self.group))

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank."""
        if self.size == 1:
            return [data]
        import torch.distributed as dist

        def call() -> list[bytes]:
            lengths = self._lengths(len(data))
            longest = max(lengths)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(gathered, mine, group=self.group)
            return [g[:n].numpy().tobytes() for g, n in zip(gathered, lengths, strict=True)]

        return self._run("all-gather", call)

    def gather_bytes(self, data: bytes, dst: int = 0) -> list[bytes] | None:
        """Every rank's ``data`` on rank ``dst`` (None elsewhere)."""
        if self.size == 1:
            return [data]
        import torch.distributed as dist

        def call() -> list[bytes] | None:
            lengths = self._lengths(len(data))
            longest = max(lengths)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.rank != dst:
                dist.gather(mine, None, dst=self._global(dst), group=self.group)
                return None
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            dist.gather(mine, gathered, dst=self._global(dst), group=self.group)
            return [g[:n].numpy().tobytes() for g, n in zip(gathered, lengths, strict=True)]

        return self._run("gather", call)

    def _lengths(self, mine: int) -> list[int]:
        import torch.distributed as dist

        local = torch.tensor([mine], dtype=torch.int64)
        every = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(every, local, group=self.group)
        return [int(t.item()) for t in every]

    def _global(self, group_rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.group, group_rank)

    # -- JSON and flags ---------------------------------------------------------------------------------
    def broadcast_json(self, value: Any, src: int = 0) -> Any:
        return _loads(self.broadcast_bytes(_dumps(value) if self.rank == src else None, src))

    def all_gather_json(self, value: Any) -> list[Any]:
        return decode_all(self.all_gather_bytes(_dumps(value)))

    def gather_json(self, value: Any, dst: int = 0) -> list[Any] | None:
        gathered = self.gather_bytes(_dumps(value), dst)
        return None if gathered is None else decode_all(gathered)

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(bool(flag))], dtype=torch.int32)
        self._run("all-reduce", lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group))
        return bool(value.item())

    def all_true_each(self, flags: list[bool]) -> list[bool]:
        """For each position, True on every rank when ``flags`` is true there on every rank (every rank
        passes as many flags; one all-reduce whatever the number of ranks)."""
        if self.size == 1 or not flags:
            return list(flags)
        import torch.distributed as dist

        value = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        self._run("all-reduce", lambda: dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group))
        return [bool(v) for v in value.tolist()]

    def first_true(self, flag: bool) -> int | None:
        """The lowest rank whose ``flag`` is true, on every rank; None when no rank's is."""
        if self.size == 1:
            return 0 if flag else None
        import torch.distributed as dist

        value = torch.tensor([self.rank if flag else self.size], dtype=torch.int64)
        self._run("all-reduce", lambda: dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group))
        first = int(value.item())
        return first if first < self.size else None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode("utf-8")


def decode_all(messages: list[bytes]) -> list[Any]:
    """Every rank's JSON message (rank 0 decoding N reports: a burst of containers and no cycle, so
    the collector stays paused for the whole list; collecting after each report tripled the time)."""
    with paused_gc():
        return [_loads(raw) for raw in messages]


def _loads(raw: bytes) -> Any:
    try:
        with paused_gc():  # rank 0 decodes every rank's report: a burst of containers, no cycles
            return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistributedError(f"a coordination message was garbled ({exc})") from None
