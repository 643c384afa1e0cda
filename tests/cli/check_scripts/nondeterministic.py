"""Not deterministic: a generator seeded from os.urandom adds noise to every batch."""

import os

import tiny
import torch

import unbroken

args = tiny.parse_args()
model, opt = tiny.model_and_optimizer()
noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
with unbroken.CheckpointManager(args.run_dir, {"model": model, "optimizer": opt},
                                every_steps=args.save_interval) as ckpt:
    start = ckpt.restore()
    for step in range(start, args.steps):
        x, y = tiny.get_batch()
        x = x + 0.01 * torch.randn(x.shape, generator=noise)
        loss = tiny.loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step(step + 1, metrics={"loss": loss.item()})
