"""Sharded (FSDP2 ``fully_shard``) training made crash-safe with unbroken: no rank ever gathers the model.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_train.py --run-dir runs/fsdp --steps 30

Each rank saves its own pieces of the sharded parameters and optimizer state (DTensors) with their
offsets in the whole tensors; rank 0 commits the checkpoint.  Kill it and run the same command
again to resume; run it with another ``--nproc_per_node`` (1, 2, 4, ...) to resume on a different
number of ranks: each rank reads only the byte ranges of the saved pieces that overlap its new
piece.  The checkpoint also loads into the plain, unsharded model in one process:

    python -c "import unbroken, examples.fsdp_train as f; m = f.make_model(); \\
               unbroken.load('runs/fsdp', {'model': m}, strict=False)"

(``strict=False`` because the training state also holds the optimizer and the data position.)

Output (rank 0): ``resumed from step <k>`` once, then ``step <n> loss <float.hex(loss)>`` per step.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import unbroken


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FSDP2 training with crash-safe resume on any number of ranks.")
    p.add_argument("--run-dir", required=True, help="checkpoint directory, the same path on every rank")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-interval", type=int, default=5)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    return p.parse_args(argv)


def make_model(width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = make_model(args.width)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # parameters are now DTensors sharded on dim 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # its state is sharded like the parameters
    state = {"model": model, "optimizer": opt}
    with unbroken.CheckpointManager(args.run_dir, state, every_steps=args.save_interval,
                                    keep_last=args.keep_last) as ckpt:
        step = ckpt.restore()
        if rank == 0:
            print(f"resumed from step {step}", flush=True)
        while step < args.steps:
            step += 1
            g = torch.Generator().manual_seed(step * 1000 + rank)  # this rank's batch of this step
            x = torch.randn(16, 32, generator=g)
            y = (x[:, :10] * 3).argmax(dim=1)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(step, metrics={"loss": loss.item()})
            if rank == 0:
                print(f"step {step} loss {loss.item().hex()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
