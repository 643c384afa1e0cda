"""A training process for the pre-emption tests: stops on signals or a deadline, resumes exactly.

    python tests/preempt_train.py RUN_DIR TOTAL_STEPS [--async] [--sleep S] [--big MB] [--max-runtime S]
                                  [--margin S] [--distributed] [--mirror URL] [--keep-local N]

Writes ``START <step>``, ``STEP <n>`` after each step and ``DONE <digest>`` at the end to stdout, one
write(2) per line.  With ``--distributed`` it joins a gloo process group from the environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), trains a DDP model and all ranks checkpoint together
into RUN_DIR.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import time

import torch
from torch import nn

import unbroken


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                h.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("total", type=int)
    parser.add_argument("--async", dest="background", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--big", type=int, default=0, help="an extra tensor of this many MB (slow saves)")
    parser.add_argument("--max-runtime", type=float, default=None)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--mirror", help="mirror_to URL; storage options in $UNBROKEN_TEST_STORAGE_OPTIONS (JSON)")
    parser.add_argument("--keep-local", type=int, default=2)
    args = parser.parse_args()
    run_dir = args.run_dir
    rank = 0
    if args.distributed:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank = torch.distributed.get_rank()  # every rank saves its part of one checkpoint in run_dir
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {"model": model, "optimizer": optimizer, "big": torch.zeros(args.big * 262144)}
    options = json.loads(os.environ.get("UNBROKEN_TEST_STORAGE_OPTIONS", "null"))
    url_run = "://" in run_dir
    ckpt = unbroken.CheckpointManager(run_dir, state, every_steps=1, keep_last=args.keep_local,
                                      async_save=args.background, max_runtime=args.max_runtime,
                                      deadline_margin=args.margin, mirror_to=args.mirror,
                                      mirror_options=options if args.mirror else None,
                                      storage_options=options if url_run else None)
    torch.manual_seed(1000 + rank)  # the data stream; restore() replaces it with the saved one
    start = ckpt.restore()
    emit(f"START {start}")
    for step in range(start + 1, args.total + 1):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["big"].fill_(float(step))
        time.sleep(args.sleep)
        emit(f"STEP {step}")
        ckpt.step(step)
    ckpt.close()
    emit(f"DONE {digest(model, optimizer)}")
    if args.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
