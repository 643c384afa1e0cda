"""A loop that resumes exactly: the batch is drawn inside the step, everything else is in the state."""

import tiny

import unbroken

args = tiny.parse_args()
model, opt = tiny.model_and_optimizer()
with unbroken.CheckpointManager(args.run_dir, {"model": model, "optimizer": opt},
                                every_steps=args.save_interval) as ckpt:
    start = ckpt.restore()
    for step in range(start, args.steps):
        x, y = tiny.get_batch()
        loss = tiny.loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step(step + 1, metrics={"loss": loss.item()})
