"""Mid-epoch resume with a shuffled DataLoader, 2 workers and random augmentations, exact to the bit.

    python examples/dataloader_resume.py --run-dir runs/data --epochs 3 --loader plain

Kill it at any moment and run it again: the batches after the resume point are the ones the
uninterrupted run would have seen (same samples, same augmentation noise) and the final weights
are identical.  ``--loader`` picks what is registered in the manager's state:

* ``plain``: an ordinary ``torch.utils.data.DataLoader`` (made resumable in place on registration);
* ``unbroken``: ``unbroken.DataLoader``, the drop-in subclass;
* ``stateful``: torchdata's ``StatefulDataLoader`` over an iterable dataset whose state (and
  randomness) lives in ``state_dict()``.

Output per step: ``step <n> epoch <e> batch <crc32 of the batch bytes> loss <float.hex>``.
"""

from __future__ import annotations

import argparse
import random
import zlib

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import unbroken


class NoisyImages(Dataset):
    """Fixed synthetic 'images' with an augmentation drawing from torch, random and NumPy."""

    def __init__(self, n: int = 90) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        flip = -1.0 if random.random() < 0.5 else 1.0
        scale = float(np.random.uniform(0.8, 1.2))
        return self.x[i] * flip * scale + 0.1 * torch.randn(16), self.y[i]


class NoisyStream(IterableDataset):
    """The same data as a stream whose position (and per-position randomness) is its state.

    The rule for a resumable iterable dataset: ``load_state_dict`` means "the next ``__iter__``
    continues from here" (possibly with nothing left of the epoch); any other ``__iter__`` starts a
    new epoch.  Resetting the position at the end of an epoch instead would be wrong, because workers
    prefetch past the end before the training loop has consumed it.
    """

    def __init__(self, n: int = 90) -> None:
        self.base, self.position, self.resuming = NoisyImages(n), 0, False

    def __iter__(self):
        if not self.resuming:
            self.position = 0
        self.resuming = False
        info = get_worker_info()  # each worker streams its own shard; its position is per worker
        shard, shards = (info.id, info.num_workers) if info is not None else (0, 1)
        while (i := shard + self.position * shards) < len(self.base):
            g = torch.Generator().manual_seed(i)
            self.position += 1
            yield self.base.x[i] + 0.1 * torch.randn(16, generator=g), self.base.y[i]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position, self.resuming = state["position"], True


def make_loader(kind: str, workers: int):
    if kind == "plain":
        return DataLoader(NoisyImages(), batch_size=8, shuffle=True, num_workers=workers)
    if kind == "unbroken":
        return unbroken.DataLoader(NoisyImages(), batch_size=8, shuffle=True, num_workers=workers)
    from torchdata.stateful_dataloader import StatefulDataLoader

    # Its own generator: otherwise creating the iterator on resume draws from the global torch RNG
    # at a different moment than the uninterrupted run did, shifting dropout afterwards.
    return StatefulDataLoader(NoisyStream(), batch_size=8, num_workers=workers,
                              generator=torch.Generator().manual_seed(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--loader", choices=["plain", "unbroken", "stateful"], default="plain")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--final", default=None, help="write the final state here (unbroken.save)")
    args = p.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = make_loader(args.loader, args.workers)
    state = {"model": model, "optimizer": opt, "loader": loader, "epoch": 0}
    ckpt = unbroken.CheckpointManager(args.run_dir, state, every_steps=1, keep_last=2, save_on_close=False)
    step = ckpt.restore()
    print(f"resumed from step {step}", flush=True)
    for epoch in range(state["epoch"], args.epochs):
        state["epoch"] = epoch
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            ckpt.step(step)
            crc = zlib.crc32(x.numpy().tobytes() + y.numpy().tobytes())
            print(f"step {step} epoch {epoch} batch {crc:08x} loss {float.hex(loss.item())}", flush=True)
        state["epoch"] = epoch + 1
    ckpt.close()
    if args.final:
        unbroken.save(args.final, {"model": model, "optimizer": opt}, step=step, rng=False)


if __name__ == "__main__":
    main()
