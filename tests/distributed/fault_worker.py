"""A DDP job whose first save meets a fault on one rank (armed through UNBROKEN_FAILPOINT in that
rank's environment only), for tests/distributed/test_save_faults.py.

    fault_worker.py RUN [--async]

Prints ``RAISED <seconds> <error type>: <message>`` for the first save, then tries a second save
(unless the job lost a rank) and prints ``SAVED 2`` or ``RAISED2 ...``.  With ``HANG_RANK=r`` in the
environment, rank r never joins the save (it sleeps, then exits): the others must time out.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import unbroken
from unbroken.errors import DistributedError


def main() -> None:
    run, background = sys.argv[1], "--async" in sys.argv
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    ckpt = unbroken.CheckpointManager(run, {"model": model, "optimizer": opt}, async_save=background,
                                      dist_timeout=float(os.environ.get("DIST_TIMEOUT", "20")))
    if os.environ.get("HANG_RANK") == str(dist.get_rank()):
        time.sleep(float(os.environ.get("DIST_TIMEOUT", "20")) + 2)
        os._exit(0)
    started = time.monotonic()
    lost_a_rank = False
    try:
        ckpt.save(1)
        print("SAVED 1", flush=True)
    except unbroken.UnbrokenError as exc:
        lost_a_rank = isinstance(exc, DistributedError)
        print(f"RAISED {time.monotonic() - started:.1f} {type(exc).__name__}: {exc}", flush=True)
    if lost_a_rank:  # the job cannot go on without that rank (its collectives would fail too)
        os._exit(0)
    try:
        ckpt.save(2)
        print("SAVED 2", flush=True)
    except unbroken.UnbrokenError as exc:
        print(f"RAISED2 {type(exc).__name__}: {exc}", flush=True)
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
