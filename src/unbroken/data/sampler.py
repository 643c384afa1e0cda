"""A sampler that can start an epoch at any position in O(1): the order is a pure function of
``(seed, epoch)``, so resuming regenerates the permutation and slices it, with no replay.

Resuming on a different number of ranks (docs/DISTRIBUTED.md): ranks take turns through one global
order (``DistributedSampler``'s layout), so after every rank consumed ``p`` samples of an epoch,
exactly the first ``p × world_size`` samples of that order are consumed.  A resume on ``M`` ranks
re-splits the rest of the order across the ``M`` ranks (``split``: the epoch and how many samples of
its order were consumed before the re-split), so the epoch continues with no sample repeated and
none skipped, except the padding ``DistributedSampler`` also adds to make the ranks' shares equal.
This assumes, as synchronous data-parallel training guarantees, that every rank was at the same
position; ``reshard_state_dict`` checks it when the manager resumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import StateMismatchError

__all__ = ["ResumableSampler", "EpochCursor", "distributed_settings", "layout_problems", "consumed_samples",
           "same_position", "load_split"]


def distributed_settings(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


@dataclass
class EpochCursor:
    """Which epoch an iteration is in and how far it got (in samples or batches, the owner's unit).

    A new iteration starts the next epoch, or the one asked for with :meth:`request`, or, right
    after a resume, continues the saved epoch at the saved position.  ``finished`` tells an epoch
    whose end was already seen (the loop moved on) from one whose last item was just consumed
    (the loop still has to see the end): the first resumes at the next epoch, the second yields
    an empty rest of the same epoch, exactly as the uninterrupted loop would.
    """

    epoch: int = 0
    position: int = 0
    started: bool = False
    finished: bool = False
    requested: int | None = None
    resume_at: int | None = None

    def request(self, epoch: int) -> None:
        self.requested = int(epoch)

    def advance(self) -> tuple[int, int]:
        if self.resume_at is not None:
            epoch, start = self.epoch, self.resume_at
        elif self.requested is not None:
            epoch, start = self.requested, 0
        else:
            epoch, start = (self.epoch + 1 if self.started else self.epoch), 0
        self.requested = self.resume_at = None
        self.started, self.finished = True, False
        self.epoch, self.position = epoch, start
        return epoch, start

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "started": self.started, "finished": self.finished}

    def load(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.started, self.finished = bool(state["started"]), bool(state["finished"])
        self.resume_at = self.position if self.started and not self.finished else None
        self.requested = None


class ResumableSampler(Sampler[int]):
    """Shuffled (or sequential) indices of ``data_source``, sharded across ranks like
    ``DistributedSampler`` (padding by repetition, or ``drop_last``), resumable at any position.

    ``seed=None`` draws a seed from torch's global RNG, so a run seeded with ``torch.manual_seed``
    gets a reproducible order.  Used standalone, the epoch advances on every new iteration (or is
    set with :meth:`set_epoch`) and the position counts indices handed out, which is exact with
    ``num_workers=0``; with workers register the DataLoader instead: it counts batches consumed,
    not prefetched.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int | None = None,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False) -> None:
        self.dataset_len = data_source if isinstance(data_source, int) else len(data_source)
        if self.dataset_len < 0:
            raise ValueError("data_source length must be >= 0")
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.rank, self.world_size = distributed_settings(rank, world_size)
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else int(seed)
        self.cursor = EpochCursor()
        self.split: tuple[int, int] | None = None  # (epoch, samples of its order consumed before a re-split)
        self.owner: Any = None  # weakref to a DataLoader driving this sampler: set_epoch goes to its cursor

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    @property
    def num_samples(self) -> int:
        n, w = self.dataset_len, self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, epoch: int) -> int:
        """How many samples of ``epoch``'s order were consumed before a re-split (0: none)."""
        return self.split[1] if self.split is not None and self.split[0] == epoch else 0

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices for ``epoch``, in order."""
        n = self.dataset_len
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        order = order[self.offset(epoch):]
        rest, w = len(order), self.world_size
        total = (rest // w if self.drop_last else math.ceil(rest / w)) * w
        if total > rest > 0:  # pad by repetition, as DistributedSampler does
            order = torch.cat([order] * math.ceil(total / rest))
        return order[:total][self.rank:total:self.world_size]

    def iter_positions(self, epoch: int, start: int) -> Iterator[tuple[int, int]]:
        """``(position, index)`` pairs of ``epoch`` from ``start`` on: a slice, no replay."""
        for offset, index in enumerate(self.indices(epoch)[start:].tolist()):
            yield start + offset, index

    def set_epoch(self, epoch: int) -> None:
        owner = self.owner() if self.owner is not None else None
        (owner.cursor if owner is not None else self.cursor).request(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.cursor.advance()
        for position, index in self.iter_positions(epoch, start):
            self.cursor.position = position + 1
            yield index
        self.cursor.finished = True

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **self.cursor.state(), **self.layout(), "split": _split_state(self.split)}

    def layout(self) -> dict[str, Any]:
        """What must be equal between save and resume for positions to mean the same samples."""
        return {"dataset_len": self.dataset_len, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "world_size": self.world_size, "rank": self.rank}

    def check_state_dict(self, state: dict[str, Any]) -> list[str]:
        return layout_problems(self.layout(), state, resplit=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; saved on another number of ranks, re-split the epoch's rest."""
        problems = self.check_state_dict(state)
        if problems:
            raise StateMismatchError("cannot resume the sampler: " + "; ".join(problems))
        self.seed = int(state["seed"])
        self.split = load_split(state.get("split"))
        self.cursor.load(state)
        saved_world = int(state["world_size"])
        if saved_world != self.world_size and self.cursor.resume_at is not None:
            self.split = (self.cursor.epoch, consumed_samples(self.dataset_len, self.offset(self.cursor.epoch),
                                                              self.cursor.position, saved_world))
            self.cursor.position = self.cursor.resume_at = 0

    def reshard_state_dict(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """From every saved rank's state (another number of ranks), the one to load: they must agree
        on the position, which synchronous data-parallel training guarantees."""
        return same_position(states, ("seed", "epoch", "position", "started", "finished", "split"))


_HINTS = {
    "dataset_len": "the dataset changed size; positions would point at different samples",
    "world_size": "this sampler cannot re-split a position across a different number of ranks",
    "rank": "each rank must resume its own data stream",
    "batch_size": "positions are counted in batches of the saved size",
}


_PER_WORLD = frozenset({"world_size", "rank", "batches_per_epoch"})


def layout_problems(live: dict[str, Any], saved: dict[str, Any], resplit: bool = False) -> list[str]:
    """Differences that make a saved position meaningless.  With ``resplit`` (the owner re-splits an
    epoch across a new number of ranks) the rank and the per-rank counts may change with the world size."""
    changed_world = resplit and "world_size" in saved and saved["world_size"] != live.get("world_size")
    problems = []
    for key, value in live.items():
        if changed_world and key in _PER_WORLD:
            continue
        if key in saved and saved[key] != value:
            hint = _HINTS.get(key, "use the same setting as the saved run")
            problems.append(f"{key} was {saved[key]!r} when saved but is {value!r} now ({hint})")
    return problems


def consumed_samples(dataset_len: int, offset: int, position: int, world_size: int) -> int:
    """Samples of an epoch's global order consumed once every one of ``world_size`` ranks consumed
    ``position`` samples of the part starting at ``offset`` (padding repeats do not count)."""
    return offset + min(position * world_size, max(dataset_len - offset, 0))


def same_position(states: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """``states[0]``, after checking every state agrees on ``keys``; StateMismatchError naming the first
    rank that does not."""
    first = {k: states[0].get(k) for k in keys}
    for rank, state in enumerate(states[1:], start=1):
        other = {k: state.get(k) for k in keys}
        if other != first:
            raise StateMismatchError(f"the saved ranks were at different data positions (rank 0: {first}, rank "
                                     f"{rank}: {other}); the rest of the epoch cannot be re-split across a new "
                                     "number of ranks")
    return states[0]


def _split_state(split: tuple[int, int] | None) -> list[int] | None:
    return None if split is None else [split[0], split[1]]


def load_split(value: Any) -> tuple[int, int] | None:
    """A saved ``split`` (``[epoch, offset]`` or None), checked."""
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise StateMismatchError(f"cannot resume: malformed saved split {value!r}")
    return int(value[0]), int(value[1])
