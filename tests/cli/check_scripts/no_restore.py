"""Never calls restore(): started again, it trains from step 0; there is no resume to check."""

import tiny

import unbroken

args = tiny.parse_args()
model, opt = tiny.model_and_optimizer()
with unbroken.CheckpointManager(args.run_dir, {"model": model, "optimizer": opt},
                                every_steps=args.save_interval) as ckpt:
    for step in range(args.steps):
        x, y = tiny.get_batch()
        loss = tiny.loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step(step + 1, metrics={"loss": loss.item()})
