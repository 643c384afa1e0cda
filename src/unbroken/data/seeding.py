"""Per-sample randomness that does not depend on which worker fetched a sample, or when.

A worker's running RNG depends on how far it had prefetched, so an augmentation that draws from it
cannot reproduce after a resume.  Instead, every sample's Python, NumPy and torch global RNGs are
seeded from ``(seed, epoch, rank, position)`` right before ``dataset[index]`` runs.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

__all__ = ["sample_seed", "SeededDataset"]

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finaliser: a cheap, well-distributed 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A 63-bit seed unique to one sample of one epoch on one rank."""
    value = 0
    for part in (seed, epoch, rank, position):
        value = _mix(value ^ (part & _MASK))
    return value >> 1


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: never initialises CUDA


class SeededDataset(Dataset[Any]):
    """Wraps a map-style dataset; ``self[(index, seed)]`` is ``dataset[index]`` under seeded RNGs.

    In the main process (``num_workers=0``) the training loop's own RNG states are put back after
    the sample, so data loading never shifts the random stream of dropout and friends.
    """

    __getitems__ = None  # batched fetching would bypass per-sample seeding; the fetcher checks this

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            _seed_globals(seed)
            return self.dataset[index]
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            _seed_globals(seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (during unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)
