"""Tiny real datasets for the data-position tests: their augmentations draw from every global RNG."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


class AugmentedSquares(Dataset[torch.Tensor]):
    """Item i is [i, noise from torch, random and NumPy]: equal items mean equal order AND equal randomness."""

    def __init__(self, n: int = 37) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        noise = torch.rand(2)
        return torch.cat([torch.tensor([float(index)]), noise,
                          torch.tensor([random.random(), float(np.random.rand())])])


class CountingStream(IterableDataset[torch.Tensor]):
    """An iterable dataset with its position in state_dict(); its randomness is derived from the position.
    ``load_state_dict`` makes the next ``__iter__`` continue; any other ``__iter__`` starts over."""

    def __init__(self, n: int = 40, seed: int = 7) -> None:
        self.n, self.seed, self.position, self.resuming = n, seed, 0, False

    def __iter__(self) -> Any:
        if not self.resuming:
            self.position = 0
        self.resuming = False
        info = get_worker_info()
        shard, shards = (info.id, info.num_workers) if info is not None else (0, 1)
        while (i := shard + self.position * shards) < self.n:
            g = torch.Generator().manual_seed(self.seed * 100_003 + i)
            self.position += 1
            yield torch.tensor([float(i), torch.rand(1, generator=g).item()])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.resuming = state["position"], True
