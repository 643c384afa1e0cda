"""A tiny but real training run that crashes on request, for tests/cli/test_supervisor.py.

    python tests/supervised_train.py RUN_DIR OUT --steps 30 --every 5 --crash-at 7,13,22 --markers DIR

Trains an MLP with dropout (SGD with momentum, batches drawn from the global torch RNG) and
checkpoints every ``--every`` steps with unbroken, resuming from the newest checkpoint at start.
``--crash-at`` steps crash the process (``os._exit(1)``) right after that step's optimizer update,
before its checkpoint: once per step, recorded by a marker file in ``--markers``, or at every
attempt with ``--crash-always``.  Each attempt appends ``<UNBROKEN_RESTART> <start step>`` to
``--log``.  At the end the model and optimizer state go to ``OUT`` (``torch.save``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

import unbroken


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)  # one thread: the same float summation order in every attempt
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    manager = unbroken.CheckpointManager(args.run_dir, {"model": model, "optimizer": opt},
                                         every_steps=args.every, async_save=False)
    start = manager.restore()
    if args.log:
        with open(args.log, "a") as log:
            log.write(f"{os.environ.get('UNBROKEN_RESTART', '-')} {start}\n")
    for step in range(start, args.steps):
        x = torch.randn(16, 8)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        _maybe_crash(args, step + 1)
        manager.step(step + 1, metrics={"loss": loss.item()})
    manager.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.out)


def _maybe_crash(args: argparse.Namespace, step: int) -> None:
    if step not in args.crash_at:
        return
    marker = Path(args.markers) / f"crashed_at_{step}"
    if marker.exists() and not args.crash_always:
        return
    marker.touch()
    print(f"crashing at step {step} (restart {os.environ.get('UNBROKEN_RESTART')})", file=sys.stderr, flush=True)
    os._exit(1)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--crash-at", type=lambda s: {int(v) for v in s.split(",") if v}, default=set())
    parser.add_argument("--crash-always", action="store_true")
    parser.add_argument("--markers", default=".")
    parser.add_argument("--log")
    return parser.parse_args()


if __name__ == "__main__":
    main()
