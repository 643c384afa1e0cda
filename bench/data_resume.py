"""Restore cost of the data position: flat in the position for unbroken, linear for replay.

    .venv/bin/python bench/data_resume.py [--positions 10 10000 1000000] [--repeats 3]

For each position P (in batches of 8) it measures, in the same run:
* unbroken: ``DataLoader.load_state_dict`` + time to the first batch after the resume point;
* index skip (HF Accelerate ``skip_first_batches`` style): iterate the batch sampler P times,
  discarding indices, then fetch the first batch;
* replay (the transformers < 4.x style): iterate the DataLoader P times, loading and discarding data.
Replay is only run up to ``--max-replay`` batches (it is linear; the table says where it stopped).
Prints a markdown table and appends it to bench/RESULTS.md with ``--record``.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, Dataset, RandomSampler

import unbroken

BATCH = 8


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def ours(n: int, position: int) -> tuple[float, torch.Tensor]:
    loader = unbroken.DataLoader(Indices(n), batch_size=BATCH, shuffle=True, seed=0)
    it = iter(loader)
    for _ in range(1):  # a real saved state, at position 1, then moved to P (the state is just numbers)
        next(it)
    state = loader.state_dict()
    state["cursor"]["position"] = position
    fresh = unbroken.DataLoader(Indices(n), batch_size=BATCH, shuffle=True, seed=0)
    start = time.perf_counter()
    fresh.load_state_dict(state)
    batch = next(iter(fresh))
    return time.perf_counter() - start, batch


def index_skip(n: int, position: int) -> tuple[float, torch.Tensor]:
    data = Indices(n)
    sampler = BatchSampler(RandomSampler(data, generator=torch.Generator().manual_seed(0)), BATCH, False)
    start = time.perf_counter()
    indices = next(itertools.islice(iter(sampler), position, None))
    batch = torch.stack([data[i] for i in indices])
    return time.perf_counter() - start, batch


def replay(n: int, position: int) -> tuple[float, torch.Tensor]:
    loader = torch.utils.data.DataLoader(Indices(n), batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    batch = next(itertools.islice(iter(loader), position, None))
    return time.perf_counter() - start, batch


def median(fn, n: int, position: int, repeats: int) -> float:
    return statistics.median(fn(n, position)[0] for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--positions", type=int, nargs="+", default=[10, 10_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-replay", type=int, default=100_000)
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    n = (max(args.positions) + 1) * BATCH  # one epoch long enough for the largest position
    rows = ["| position (batches) | unbroken restore + first batch | index skip | replay | replay / unbroken |",
            "|---|---|---|---|---|"]
    for position in args.positions:
        t_ours = median(ours, n, position, args.repeats)
        t_skip = median(index_skip, n, position, args.repeats)
        t_replay = median(replay, n, position, 1) if position <= args.max_replay else None
        replay_cell = f"{t_replay:.3f} s" if t_replay is not None else "not run (linear)"
        ratio = f"{t_replay / t_ours:.0f}×" if t_replay is not None else "-"
        rows.append(f"| {position:,} | {t_ours:.3f} s | {t_skip:.3f} s | {replay_cell} | {ratio} |")
        print(rows[-1], flush=True)
    header = (f"\n## Data position restore ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
              f"torch {torch.__version__}, dataset of {n:,} samples, batch {BATCH}, 1 thread)\n\n"
              f"Command: `.venv/bin/python bench/data_resume.py {' '.join(sys.argv[1:])}`\n\n")
    table = header + "\n".join(rows) + "\n"
    print(table)
    if args.record:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as out:
            out.write(table)


if __name__ == "__main__":
    main()
