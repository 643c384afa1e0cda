"""Data-parallel (DDP) training made crash-safe with unbroken: every rank saves its part of one checkpoint.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --run-dir runs/ddp --steps 40

Kill it (Ctrl-C, ``kill -9`` on every rank, a lost node) and run the same command again: every rank
resumes from the newest checkpoint that all of them can read, bit for bit.  Run it again with
another ``--nproc_per_node``: the model and optimizer come back exactly, the interrupted epoch goes
on with the samples no rank has seen yet (re-split across the new ranks), and the RNG streams follow
the documented policy (README, "Distributed training").

What unbroken does here (gloo on CPU; NCCL on GPUs works the same, unbroken talks on its own gloo group):
  * the model and optimizer are identical on every rank (DDP): their tensors are written once,
    spread over the ranks' files so each rank writes about 1/N of them;
  * each rank's RNG streams, data position (``unbroken.DataLoader`` shards like
    ``DistributedSampler``), LR scheduler and ``epoch`` are saved per rank;
  * rank 0 commits the checkpoint once every rank's file is durable; a failure on any rank fails
    the save on every rank, with nothing committed.

Output (rank 0): ``resumed from step <k>`` once, then ``step <n> loss <float.hex(loss)>`` per step.
"""

from __future__ import annotations

import argparse
import datetime
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import unbroken


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DDP training with crash-safe exact resume.")
    p.add_argument("--run-dir", required=True, help="checkpoint directory, the same path on every rank")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-interval", type=int, default=5)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--restore-mode", choices=["direct", "broadcast"], default="direct")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Blobs(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A fixed synthetic classification set; augmentation noise drawn from the global RNG."""

    def __init__(self, n: int = 512, dim: int = 16, classes: int = 4) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x @ torch.randn(dim, classes, generator=g)).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.05 * torch.randn(self.x.shape[1]), self.y[i]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    # find_unused_parameters=True keeps DDP from rebuilding its gradient buckets after the first step:
    # with more than 2 ranks the all-reduce sums in an order that depends on the buckets, and a resumed
    # run starts with the initial buckets again.  Without it, a resume is exact only up to rounding.
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    for seed_fn in (torch.manual_seed, random.seed, np.random.seed):  # per-rank streams from here on
        seed_fn(args.seed * 1000 + rank)
    loader = unbroken.DataLoader(Blobs(), batch_size=args.batch_size, shuffle=True, seed=args.seed)
    state = {"model": ddp, "optimizer": opt, "scheduler": sched, "loader": loader, "epoch": 0,
             "args": vars(args)}
    with unbroken.CheckpointManager(args.run_dir, state, every_steps=args.save_interval, keep_last=args.keep_last,
                                    restore_mode=args.restore_mode) as ckpt:
        step = ckpt.restore()
        if rank == 0:
            print(f"resumed from step {step}", flush=True)
        while step < args.steps:
            for x, y in loader:  # after a resume: the rest of the interrupted epoch
                loss = F.cross_entropy(ddp(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                ckpt.step(step, metrics={"loss": loss.item()})
                if rank == 0:
                    print(f"step {step} loss {loss.item().hex()}", flush=True)
                if step >= args.steps:
                    break
            else:
                state["epoch"] += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
