"""Jobs for tests/distributed/test_object_storage_ranks.py: several ranks (gloo, CPU) saving one
checkpoint into an s3:// run (the endpoint comes from ``FSSPEC_S3`` in the environment).

    s3_worker.py fault RUN          # DDP; save 1, then save 2 with $KILL_AT armed on this rank
    s3_worker.py fsdp-save RUN OUT  # fsdp_worker's model, 3 steps, save 3; OUT/expected.safetensors
    s3_worker.py fsdp-restore RUN OUT [--broadcast]
                                    # restore; OUT/restored.safetensors, OUT/fetched<rank>.txt (bytes
                                    # this rank took from the store), then 2 more steps and a save

``fault`` uploads in 5 MiB parts (each rank's file is about 8 MiB: a multipart upload), so a
``KILL_AT=object.part:1:kill`` leaves an unfinished multipart upload behind.  It prints ``SAVED 1``,
then ``SAVED 2`` or ``RAISED <type>: <message>``.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import unbroken
from tests.distributed.fsdp_worker import save_or_restore
from unbroken._internal import failpoints
from unbroken.errors import DistributedError

MiB = 1 << 20


def fault(run: str) -> None:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(2048, 1024))  # 8 MiB of weight, 8 of momentum
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()
    ckpt = unbroken.CheckpointManager(run, {"model": model, "optimizer": opt}, async_save=False, dist_timeout=30)
    ckpt.storage.block_size = 5 * MiB  # type: ignore[attr-defined]  # S3's smallest part
    ckpt.save(1)
    print("SAVED 1", flush=True)
    failpoints.arm(os.environ.get("KILL_AT") or None)
    try:
        ckpt.save(2)
        print("SAVED 2", flush=True)
    except unbroken.UnbrokenError as exc:
        print(f"RAISED {type(exc).__name__}: {exc}", flush=True)
        if isinstance(exc, DistributedError):  # the job cannot go on without the dead rank
            os._exit(0)
    ckpt.close()


def main() -> None:
    mode, run = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if mode == "fault":
        fault(run)
    else:
        save_or_restore(mode == "fsdp-save", run, Path(sys.argv[3]), "--broadcast" in sys.argv,
                        lambda ckpt: ckpt.storage.fetched_bytes, "fetched")  # type: ignore[attr-defined]
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
