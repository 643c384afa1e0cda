"""Gradient accumulation with the step reported per micro-step: a save between the two micro-steps of
an optimizer step loses the first one's gradients (a checkpoint holds no .grad)."""

import tiny

import unbroken

ACCUMULATE = 2

args = tiny.parse_args()
model, opt = tiny.model_and_optimizer()
with unbroken.CheckpointManager(args.run_dir, {"model": model, "optimizer": opt},
                                every_steps=args.save_interval) as ckpt:
    start = ckpt.restore()
    for micro in range(start, args.steps):
        x, y = tiny.get_batch()
        loss = tiny.loss_of(model, x, y) / ACCUMULATE
        loss.backward()
        if (micro + 1) % ACCUMULATE == 0:
            opt.step()
            opt.zero_grad()
        ckpt.step(micro + 1, metrics={"loss": loss.item()})
