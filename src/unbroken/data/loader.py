"""``unbroken.DataLoader``: a drop-in ``torch.utils.data.DataLoader`` whose position and worker
randomness resume exactly.

* The order of an epoch is a pure function of ``(seed, epoch)`` (:class:`ResumableSampler`), so a
  resume regenerates it and starts at the saved position without loading a single skipped sample.
* The position counts batches handed to the training loop, not batches prefetched by workers.
* Each sample's Python/NumPy/torch RNGs are seeded from ``(seed, epoch, rank, position)``
  (:class:`SeededDataset`), so augmentations reproduce with any number of workers.
* The loader draws worker base seeds from its own generator, never from the global torch RNG, so
  creating an iterator mid-epoch on resume does not shift the training loop's random stream.

A plain torch ``DataLoader`` registered in a manager's state is converted in place by
:func:`make_resumable` (same object, same attributes).  So is the plain loader inside Accelerate's
prepared ``DataLoaderShard`` (``accelerator.prepare(loader)``): the shard then saves and loads the
converted loader's state, as it does a torchdata ``StatefulDataLoader``'s.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import BatchSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data import DataLoader as TorchDataLoader

from ..errors import StateMismatchError, UnserializableStateError
from .sampler import EpochCursor, ResumableSampler, consumed_samples, layout_problems, load_split, same_position
from .seeding import SeededDataset, sample_seed

__all__ = ["DataLoader", "make_resumable", "needs_adoption"]

_BATCH_STRIDE = 1 << 24  # position of sample j of batch b under a custom batch sampler: b * stride + j


class DataLoader(TorchDataLoader):  # type: ignore[type-arg]
    """Same arguments as ``torch.utils.data.DataLoader``, plus ``seed`` (default: drawn from torch's
    global RNG) and ``seed_samples`` (seed worker RNGs per sample; default True)."""

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler: Sampler[Any] | None = None, batch_sampler: Sampler[Any] | None = None,
                 num_workers: int = 0, collate_fn: Callable[..., Any] | None = None, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn: Callable[[int], None] | None = None,
                 multiprocessing_context: Any = None, generator: torch.Generator | None = None, *,
                 prefetch_factor: int | None = None, persistent_workers: bool = False, pin_memory_device: str = "",
                 in_order: bool = True, seed: int | None = None, seed_samples: bool = True) -> None:
        iterable = isinstance(dataset, IterableDataset)
        if not iterable and sampler is None and batch_sampler is None:
            sampler = ResumableSampler(dataset, shuffle=bool(shuffle), seed=seed)
            shuffle = None
        elif isinstance(sampler, (RandomSampler, SequentialSampler)):
            sampler = _convert(sampler, seed)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        wrapped = SeededDataset(dataset) if seed_samples and not iterable else dataset
        super().__init__(wrapped, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         pin_memory=pin_memory, drop_last=drop_last, timeout=timeout,
                         worker_init_fn=worker_init_fn, multiprocessing_context=multiprocessing_context,
                         generator=generator, prefetch_factor=prefetch_factor,
                         persistent_workers=persistent_workers, pin_memory_device=pin_memory_device,
                         in_order=in_order)
        self._setup_resume()

    def _setup_resume(self) -> None:
        if isinstance(self.dataset, IterableDataset):
            raise UnserializableStateError(
                "an IterableDataset's position lives in the dataset: give it state_dict()/load_state_dict() "
                "and use torchdata's StatefulDataLoader, which checkpoints each worker's dataset state")
        self.cursor = EpochCursor()
        self._plan = (0, 0)
        self._outer: weakref.ref[Any] | None = None  # the Accelerate DataLoaderShard iterating this loader
        self._indices = _EpochIndices(self)
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.owner = weakref.ref(self)

    # -- iteration ------------------------------------------------------------------------------------
    @property
    def _index_sampler(self) -> Any:
        return self._indices

    def __iter__(self) -> Any:
        self._plan = self.cursor.advance()
        return _Consumed(super().__iter__(), self)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at ``epoch`` (like ``DistributedSampler.set_epoch``)."""
        self.cursor.request(epoch)

    @property
    def base_dataset(self) -> Any:
        """The user's dataset (``self.dataset`` may be the per-sample seeding wrapper)."""
        return self.dataset.dataset if isinstance(self.dataset, SeededDataset) else self.dataset

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor.state(), "layout": self._layout(), "sampler": _sampler_state(self.sampler)}

    def _layout(self) -> dict[str, Any]:
        layout: dict[str, Any] = {"batch_size": self.batch_size, "drop_last": self.drop_last,
                                  "batches_per_epoch": len(self)}
        if isinstance(self.sampler, ResumableSampler):
            layout.update(self.sampler.layout())
        else:
            layout["sampler"] = type(self.sampler).__qualname__
            layout["dataset_len"] = len(self.base_dataset)
        return layout

    def check_state_dict(self, state: Any) -> list[str]:
        if not (isinstance(state, dict) and {"cursor", "layout", "sampler"} <= state.keys()):
            return ["the saved loader state is not from unbroken.DataLoader"]
        return layout_problems(self._layout(), state["layout"], resplit=self._can_resplit())

    def _can_resplit(self) -> bool:
        """Positions are global-order positions only with our sampler and plain batching."""
        return isinstance(self.sampler, ResumableSampler) and (
            self.batch_sampler is None or type(self.batch_sampler) is BatchSampler)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved batch; saved on another number of ranks, re-split the epoch's rest
        (see :mod:`unbroken.data.sampler`)."""
        problems = self.check_state_dict(state)
        if problems:
            raise StateMismatchError("cannot resume the DataLoader: " + "; ".join(problems))
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.seed = int(state["sampler"]["seed"])
            self.sampler.split = load_split(state["sampler"].get("split"))
        elif state["sampler"].get("epoch") is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["sampler"]["epoch"])
        self.cursor.load(state["cursor"])
        saved_world = state["layout"].get("world_size")
        if isinstance(self.sampler, ResumableSampler) and saved_world != self.sampler.world_size:
            self._resplit(int(saved_world))
        _sync_shard(self)

    def _resplit(self, saved_world: int) -> None:
        """The saved ranks consumed ``position`` batches each: continue the epoch's global order from
        there, shared among this world's ranks."""
        sampler, cursor = self.sampler, self.cursor
        if not isinstance(sampler, ResumableSampler) or cursor.resume_at is None:
            return  # not started, or already at the epoch's end: nothing to re-split
        per_batch = self.batch_size or 1
        sampler.split = (cursor.epoch, consumed_samples(sampler.dataset_len, sampler.offset(cursor.epoch),
                                                        cursor.position * per_batch, saved_world))
        cursor.position = cursor.resume_at = 0

    def reshard_state_dict(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """From every saved rank's state (another number of ranks), the one to load: every rank must
        have been at the same batch of the same epoch, with the same seed."""
        same_position(states, ("cursor", "sampler"))
        return states[0]


class _Consumed:
    """Counts the batches the training loop actually received (prefetched ones do not count)."""

    def __init__(self, inner: Iterator[Any], loader: DataLoader) -> None:
        self.inner, self.loader = inner, loader

    def __iter__(self) -> _Consumed:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self.inner)
        except StopIteration:
            self.loader.cursor.finished = True
            raise
        self.loader.cursor.position += 1
        return batch

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _EpochIndices:
    """What the DataLoader iterator draws indices from: the current epoch, from the resume point,
    tagged with per-sample seeds.  Iterating it twice yields the same thing (torch may do that)."""

    def __init__(self, loader: DataLoader) -> None:
        # A weak reference: a cycle would keep a dropped loader, and its worker processes, alive
        # until the garbage collector runs (at exit, that means waiting for worker timeouts).
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> DataLoader:
        loader = self._loader()
        if loader is None:
            raise RuntimeError("the DataLoader of this iterator no longer exists")
        return loader

    def __len__(self) -> int:
        loader = self.loader
        source: Any = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
        return len(source)

    def __iter__(self) -> Iterator[Any]:
        loader = self.loader
        epoch, skip = loader._plan
        seeded = isinstance(loader.dataset, SeededDataset)
        sampler, batch_sampler = loader.sampler, loader.batch_sampler
        seed = sampler.seed if isinstance(sampler, ResumableSampler) else 0
        # Accelerate's BatchSamplerShard names the rank; the global-order sampler inside it is rank 0 of 1.
        rank = getattr(batch_sampler, "process_index", getattr(sampler, "rank", 0))
        # This generator lives in the loader's (persistent) iterator: holding the loader in its frame
        # would make a cycle that keeps worker processes alive until a garbage collection.
        del loader

        def tag(position: int, index: int) -> Any:
            return (index, sample_seed(seed, epoch, rank, position)) if seeded else index

        if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
            if isinstance(sampler, ResumableSampler):  # the global order inside a sharding batch sampler
                sampler.cursor.request(epoch)
            for b, batch in enumerate(itertools.islice(iter(batch_sampler), skip, None), start=skip):
                yield [tag(b * _BATCH_STRIDE + j, i) for j, i in enumerate(batch)]
            return
        per_batch = batch_sampler.batch_size if batch_sampler is not None else 1
        tagged = (tag(p, i) for p, i in _positions(sampler, epoch, skip * per_batch))
        if batch_sampler is None:
            yield from tagged
            return
        yield from _batches(tagged, per_batch, batch_sampler.drop_last)


def _positions(sampler: Any, epoch: int, start: int) -> Iterator[tuple[int, int]]:
    if isinstance(sampler, ResumableSampler):
        sampler.cursor.epoch = epoch
        return sampler.iter_positions(epoch, start)
    # A foreign sampler (DistributedSampler, a custom one): its order is its own; skip by slicing.
    return enumerate(itertools.islice(iter(sampler), start, None), start=start)


def _batches(items: Iterator[Any], size: int, drop_last: bool) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch


def _sampler_state(sampler: Any) -> dict[str, Any]:
    if isinstance(sampler, ResumableSampler):
        split = None if sampler.split is None else list(sampler.split)
        return {"seed": sampler.seed, "split": split}
    epoch = getattr(sampler, "epoch", None)
    return {"epoch": epoch if isinstance(epoch, int) else None}


def _convert(sampler: Any, seed: int | None, world_size: int | None = None) -> Any:
    """torch's default samplers → a resumable equivalent (same indices, a reproducible order)."""
    resumable = partial(ResumableSampler, rank=None if world_size is None else 0, world_size=world_size)
    if isinstance(sampler, SequentialSampler):
        return resumable(len(sampler), shuffle=False, seed=0)
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None:
        if seed is None and sampler.generator is not None:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=sampler.generator).item())
        return resumable(len(sampler.data_source), shuffle=True, seed=seed)
    return sampler


def needs_adoption(value: Any) -> bool:
    """A plain torch DataLoader (no state_dict of its own) that :func:`make_resumable` can convert, or an
    Accelerate wrapper (``accelerator.prepare(loader)``) around one."""
    if not isinstance(value, TorchDataLoader):
        return False
    base = _wrapped(value)
    if base is not None:
        # The wrapper's state_dict() returns a snapshot of its inner loader's, which a plain loader
        # has not: "'DataLoader' object has no attribute 'dl_state_dict'" at the first save.
        return needs_adoption(base)
    return not callable(getattr(value, "state_dict", None))


def _wrapped(value: Any) -> Any:
    """The loader inside an Accelerate ``DataLoaderAdapter`` (which poses as its inner loader's class
    and forwards every attribute to it), else None."""
    return vars(value).get("base_dataloader") if hasattr(value, "__dict__") else None


def make_resumable(loader: TorchDataLoader) -> DataLoader:  # type: ignore[type-arg]
    """Turn a plain torch DataLoader into an :class:`unbroken.DataLoader` in place, before it is iterated.

    Its default sampler becomes a :class:`ResumableSampler` (a foreign sampler is kept and skipped
    by slicing), its dataset is wrapped for per-sample seeding, and it gets its own generator.
    """
    if isinstance(loader, DataLoader):
        return loader
    if _wrapped(loader) is not None:
        shard: DataLoader = _make_shard_resumable(loader)  # poses as a DataLoader, forwards to one
        return shard
    if isinstance(loader.dataset, IterableDataset):
        raise UnserializableStateError(
            "a plain DataLoader over an IterableDataset cannot be resumed exactly: its position lives in "
            "the dataset's workers. Fix: use torchdata's StatefulDataLoader (with a dataset that has "
            "state_dict()/load_state_dict()) and register that instead")
    if getattr(loader, "_iterator", None) is not None:
        raise ValueError("register the DataLoader before iterating it (its workers already run)")
    sampler, batch_sampler = _resumable_samplers(loader)
    # DataLoader forbids re-assigning these after __init__ (to protect iterators in flight); no
    # iterator exists yet, so the conversion is safe.
    for name, value in (("sampler", sampler), ("batch_sampler", batch_sampler),
                        ("dataset", SeededDataset(loader.dataset))):
        object.__setattr__(loader, name, value)
    if loader.generator is None:
        loader.generator = torch.Generator().manual_seed(0)
    loader.__class__ = DataLoader
    converted: DataLoader = loader  # type: ignore[assignment]
    converted._setup_resume()
    return converted


def _resumable_samplers(loader: TorchDataLoader) -> tuple[Any, Any]:  # type: ignore[type-arg]
    """The loader's sampler and batch sampler, with the sampler that orders the data made resumable."""
    batch_sampler: Any = loader.batch_sampler
    original: Any = loader.sampler
    if type(batch_sampler) is BatchSampler:
        # The batch sampler's own sampler orders the data: a loader built with batch_sampler= has a
        # SequentialSampler as its (unused) .sampler.
        sampler = _convert(batch_sampler.sampler, None)
        return sampler, BatchSampler(sampler, batch_sampler.batch_size, batch_sampler.drop_last)
    inner = getattr(batch_sampler, "batch_sampler", None)
    if type(inner) is BatchSampler and hasattr(batch_sampler, "process_index"):
        # Accelerate's BatchSamplerShard deals the batches of one global order to the ranks: that
        # order becomes a resumable sampler of rank 0 of 1, whose epoch follows the loader's.
        sampler = _convert(inner.sampler, None, world_size=1)
        batch_sampler.batch_sampler = BatchSampler(sampler, inner.batch_size, inner.drop_last)
        return sampler, batch_sampler
    return _convert(original, None), batch_sampler


def _make_shard_resumable(shard: Any) -> Any:
    """Accelerate's ``DataLoaderShard``: its inner loader made resumable in place.

    The shard iterates its inner loader one batch ahead and, before each batch it yields, snapshots
    the inner loader's state_dict() into ``dl_state_dict``, which its own state_dict() returns: the
    position of the batches the training loop received.  Loading goes to the inner loader, which
    then sets the shard's epoch counter (``iteration``: the epoch each new pass asks for).
    """
    base = vars(shard)["base_dataloader"]
    if not needs_adoption(base):
        return shard  # its inner loader has a state of its own (StatefulDataLoader, unbroken.DataLoader)
    kind = type(shard).__name__  # the real class: the adapter's __class__ is its inner loader's
    if kind != "DataLoaderShard":
        raise UnserializableStateError(
            f"Accelerate's {kind} cannot be made resumable (rank 0 reads every batch and sends them to "
            "the others). Fix: Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False)) "
            "with a map-style dataset, or use_stateful_dataloader=True")
    converted = make_resumable(base)
    converted._outer = weakref.ref(shard)
    shard.dl_state_dict = converted.state_dict()
    return shard


def _sync_shard(loader: DataLoader) -> None:
    """After a load: the Accelerate shard around ``loader`` (if any) continues from the loaded state."""
    shard = loader._outer() if loader._outer is not None else None
    if shard is None:
        return
    cursor = loader.cursor
    shard.iteration = cursor.epoch + 1 if cursor.finished else cursor.epoch
    shard.dl_state_dict = loader.state_dict()
