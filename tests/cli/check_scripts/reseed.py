"""MiniMind's defect: setup_seed(42 + epoch) at every epoch start, also when resuming inside an epoch,
replaces the RNG streams restore() put back."""

import tiny
import torch

import unbroken

STEPS_PER_EPOCH = 8

args = tiny.parse_args()
model, opt = tiny.model_and_optimizer()
with unbroken.CheckpointManager(args.run_dir, {"model": model, "optimizer": opt},
                                every_steps=args.save_interval) as ckpt:
    start = ckpt.restore()
    for epoch in range(start // STEPS_PER_EPOCH, -(-args.steps // STEPS_PER_EPOCH)):
        torch.manual_seed(42 + epoch)
        for step in range(epoch * STEPS_PER_EPOCH, min((epoch + 1) * STEPS_PER_EPOCH, args.steps)):
            if step < start:
                continue  # done before the checkpoint
            x, y = tiny.get_batch()
            loss = tiny.loss_of(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(step + 1, metrics={"loss": loss.item()})
