"""A plain PyTorch training loop made crash-safe with unbroken.

Kill it at any moment (Ctrl-C, SIGKILL, a pre-empted node) and run the same command again: it
resumes from the newest valid checkpoint and produces exactly the same numbers, bit for bit, as a
run that was never interrupted.

    python examples/plain_loop.py --run-dir runs/plain --steps 40 --save-interval 5

What makes the resume exact:
  * model, optimizer, LR scheduler and the plain ``epoch`` value are in ``state``;
  * unbroken captures and restores the global RNG streams (python ``random``, NumPy, torch), which
    dropout, the input noise and the augmentation below draw from;
  * the data order needs no loader state: the shuffle of each epoch is a pure function of
    (seed, epoch), and the position inside the epoch is a pure function of the step.

Output: ``resumed from step <k>`` once, then ``step <n> loss <float.hex(loss)>`` per completed step.
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import unbroken


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Plain training loop with crash-safe exact resume.")
    p.add_argument("--run-dir", required=True, help="checkpoint directory (created if missing)")
    p.add_argument("--steps", type=int, default=40, help="total optimizer steps")
    p.add_argument("--save-interval", "--save_interval", dest="save_interval", type=int, default=10,
                   help="save every N steps")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--dropout", type=float, default=0.1)
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Seed every global RNG so that a fresh run is deterministic; restore() overrides this."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_dataset(seed: int, n: int, dim: int = 16, classes: int = 4):
    """A fixed synthetic classification set; its own generator, so it never touches global RNG."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return x, y


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffle of one epoch, derived only from (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    seed_everything(args.seed)

    x, y = make_dataset(args.seed, args.dataset_size)
    steps_per_epoch = args.dataset_size // args.batch_size  # drop_last

    model = nn.Sequential(
        nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Dropout(args.dropout),
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(args.dropout),
        nn.Linear(64, 4),
    )
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr / 20)

    # Hyper-parameters go into the state as a plain dict. The run directory is left out on
    # purpose: it is where the run lives, not what it computes, so two copies of the same run in
    # different directories hold identical checkpoints. A copy goes into `state`: restore() replaces
    # it with the saved dict, and `hparams` must keep what this command line asked for.
    hparams = {k: v for k, v in vars(args).items() if k != "run_dir"}
    state = {"model": model, "optimizer": opt, "scheduler": sched, "epoch": 0, "args": dict(hparams)}

    ckpt = unbroken.CheckpointManager(
        args.run_dir, state=state, every_steps=args.save_interval, keep_last=args.keep_last,
        metadata={"args": vars(args)},
    )
    with ckpt:
        start = ckpt.restore()
        print(f"resumed from step {start}", flush=True)
        if state["args"] != hparams:  # e.g. relaunched with more --steps: say so, save the new ones
            old = state["args"]
            changed = sorted(k for k in old.keys() | hparams.keys() if old.get(k) != hparams.get(k))
            print("note: arguments changed since the checkpoint: " + ", ".join(
                f"{k} {old.get(k)!r} -> {hparams.get(k)!r}" for k in changed), file=sys.stderr)
            state["args"] = dict(hparams)
        # The plain value came back from the checkpoint and must agree with the step.
        assert state["epoch"] == start // steps_per_epoch, (state["epoch"], start)

        model.train()
        order, order_epoch = None, None
        for step in range(start, args.steps):
            epoch, pos = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(args.seed, epoch, args.dataset_size), epoch
            idx = order[pos * args.batch_size:(pos + 1) * args.batch_size]
            xb, yb = x[idx], y[idx]

            # Augmentation drawing from all three global RNG streams.
            if random.random() < 0.5:                              # python random
                xb = xb * float(np.random.uniform(0.9, 1.1))       # NumPy
            xb = xb + 0.05 * torch.randn_like(xb)                  # torch (as is dropout)

            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

            value = loss.item()
            print(f"step {step + 1} loss {value.hex()}", flush=True)
            state["epoch"] = (step + 1) // steps_per_epoch  # the epoch of the next step
            ckpt.step(step + 1, metrics={"loss": value})
    # Leaving the `with` block closed the manager: pending saves are done, and the final step is
    # checkpointed even when the save interval does not divide --steps.


if __name__ == "__main__":
    main()
