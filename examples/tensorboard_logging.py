"""Checkpoint figures in TensorBoard: one line with ``on_event``, or one with ``ckpt.stats``.

Every save of a CheckpointManager is an event (docs/EVENTS.md): its step, size, how long it stalled
training (``stall_s``), how long until it was durable (``commit_s``), its throughput.  Two ways to
plot them next to the loss:

  * ``on_event=``: a function that receives every event (save, restore, retention, stop, ...) as the
    dict written to the run's event log.  Here, one line sends each save's stall to TensorBoard.
  * ``ckpt.stats``: the last committed save's figures and the run's totals (saves, failed saves,
    total stall), read whenever you like.  ``ckpt.stats.scalars()`` gives them as
    ``{"checkpoint/<name>": number}``, the shape ``SummaryWriter.add_scalar`` and ``wandb.log`` take.

    python examples/tensorboard_logging.py --run-dir runs/tb --steps 40
    tensorboard --logdir runs/tb/tensorboard

Needs the ``tensorboard`` package (``pip install tensorboard``); without it this example says so and
exits 0.  ``unbroken report runs/tb`` draws the same figures without it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import unbroken


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Log unbroken's checkpoint figures to TensorBoard.")
    p.add_argument("--run-dir", required=True, help="checkpoint directory (created if missing)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-interval", type=int, default=10)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard_logging.py needs the tensorboard package: pip install tensorboard", file=sys.stderr)
        return 0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": optimizer}
    writer = SummaryWriter(os.path.join(args.run_dir, "tensorboard"))

    ckpt = unbroken.CheckpointManager(
        args.run_dir, state, every_steps=args.save_interval, keep_last=3,
        # The one line: each save's stall, at its step (called from the background save thread;
        # SummaryWriter is thread-safe).
        on_event=lambda e: e["event"] == "save" and writer.add_scalar("save/stall_s", e["stall_s"], e["step"]),
    )
    start = ckpt.restore()
    logged = ckpt.stats.step
    for step in range(start + 1, args.steps + 1):
        x = torch.randn(32, 16)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ckpt.step(step, metrics={"loss": loss.item()})
        writer.add_scalar("loss", loss.item(), step)
        if ckpt.stats.step != logged:  # a save committed since the last look: all of its figures
            logged = ckpt.stats.step
            for name, value in ckpt.stats.scalars().items():
                writer.add_scalar(name, value, logged)
    ckpt.close()
    writer.close()
    print(f"done at step {args.steps}: {ckpt.stats.saves} save(s), {ckpt.stats.total_stall_s:.3f} s of stall; "
          f"tensorboard --logdir {os.path.join(args.run_dir, 'tensorboard')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
