"""nanoGPT's defect: the next batch is drawn from the torch RNG before the step ends, and is not in the
state; the checkpoint holds the RNG after that draw, so a resumed run draws one batch more."""

import tiny

import unbroken

args = tiny.parse_args()
model, opt = tiny.model_and_optimizer()
with unbroken.CheckpointManager(args.run_dir, {"model": model, "optimizer": opt},
                                every_steps=args.save_interval) as ckpt:
    start = ckpt.restore()
    x, y = tiny.get_batch()  # the first batch, fetched before the loop
    for step in range(start, args.steps):
        loss = tiny.loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        x, y = tiny.get_batch()  # prefetch the next batch while the step finishes
        ckpt.step(step + 1, metrics={"loss": loss.item()})
