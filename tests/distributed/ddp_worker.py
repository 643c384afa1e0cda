"""A DDP training job for tests/distributed (one process per rank, gloo, CPU).

    ddp_worker.py RUN_DIR OUT_DIR STEPS [--epochs E] [--every N] [--sync] [--restore-mode direct|broadcast]
                  [--batchnorm]

Trains until STEPS steps or E epochs.  Each rank logs ``STEP <n>`` after step n and appends
``<step> <sample indices>`` to ``OUT_DIR/data<rank>.txt``.  Right after the restore rank 0 writes the
parameters and optimizer state to ``OUT_DIR/restored.safetensors`` and every rank a digest of its
RNG streams to ``OUT_DIR/rngstate<rank>.txt``; at the end the same to ``final.safetensors`` and
``rngstate_end<rank>.txt`` (before closing: what the last checkpoint holds), then one draw of each
RNG to ``rng<rank>.txt``.  Dropout makes every step depend on each rank's own RNG stream.
``--batchnorm`` adds a BatchNorm1d: its running statistics differ between ranks after every step
(each rank's own batch) until DDP's next forward broadcasts rank 0's.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import unbroken


class Indexed(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i] + 0.01 * torch.randn(6), self.y[i], i  # an augmentation drawing from the global RNG


def dump(model: nn.Module, opt: torch.optim.Optimizer, out: Path, what: str, rank: int) -> None:
    if rank == 0:
        tensors = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
        for pid, per in opt.state_dict()["state"].items():
            tensors.update({f"opt/{pid}/{k}": torch.as_tensor(v).clone() for k, v in per.items()})
        save_file(tensors, str(out / f"{what}.safetensors"))
    streams = repr((random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()))
    suffix = "" if what == "restored" else "_end"
    (out / f"rngstate{suffix}{rank}.txt").write_text(hashlib.sha256(streams.encode()).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--restore-mode", default="direct")
    parser.add_argument("--batchnorm", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(16)] if args.batchnorm else []
    model = nn.Sequential(nn.Linear(6, 16), *norm, nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    # No bucket rebuild after the first iteration: with > 2 ranks the all-reduce sums in an order that
    # depends on the bucket layout, and a resumed run starts again with the initial layout.
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    torch.manual_seed(100 + rank)  # per-rank streams (dropout, augmentation), restored on resume
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    loader = unbroken.DataLoader(Indexed(40), batch_size=4, shuffle=True, seed=11)
    state = {"model": ddp, "optimizer": opt, "scheduler": sched, "loader": loader, "epoch": 0}
    ckpt = unbroken.CheckpointManager(args.run_dir, state, every_steps=args.every, keep_last=2,
                                      async_save=not args.sync, restore_mode=args.restore_mode, dist_timeout=60)
    step = ckpt.restore()
    print(f"START {step}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dump(model, opt, args.out_dir, "restored", rank)
    log = open(args.out_dir / f"data{rank}.txt", "a")  # noqa: SIM115 (appended to for the whole run)
    while step < args.steps and state["epoch"] < args.epochs:
        for x, y, idx in loader:
            loss = nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            log.write(f"{step} {' '.join(map(str, idx.tolist()))}\n")
            log.flush()
            ckpt.step(step)
            print(f"STEP {step}", flush=True)
            if step >= args.steps:
                break
        else:
            state["epoch"] += 1
    dump(model, opt, args.out_dir, "final", rank)
    ckpt.close()
    draws = f"{random.random()!r} {np.random.rand()!r} {torch.rand(1).item()!r}"
    (args.out_dir / f"rng{rank}.txt").write_text(draws)
    dist.barrier()
    dist.destroy_process_group()
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
