"""A two-rank gloo job for tests/cli/test_supervisor.py, run under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/supervised_ddp.py OUT_DIR MODE

MODE ``crash-once``: a few all-reduces; rank 0 exits 1 on the supervisor's first attempt
(``UNBROKEN_RESTART=0``); on a later attempt rank 0 writes ``OUT_DIR/done``.
MODE ``wait-for-term``: each rank traps SIGTERM (writes ``OUT_DIR/term_<rank>`` and exits 0),
writes ``OUT_DIR/ready_<rank>`` and waits.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    if mode == "wait-for-term":
        _wait_for_term(out, rank)
        return
    dist.init_process_group("gloo")
    total = torch.ones(1)
    for _ in range(3):
        dist.all_reduce(total)
    if rank == 0 and os.environ.get("UNBROKEN_RESTART") == "0":
        print("rank 0 crashing on the first attempt", file=sys.stderr, flush=True)
        os._exit(1)
    dist.barrier()
    if rank == 0:
        (out / "done").write_text(f"{total.item()} {dist.get_world_size()} {os.environ.get('UNBROKEN_RESTART')}")
    dist.destroy_process_group()


def _wait_for_term(out: Path, rank: int) -> None:
    def on_term(signum: int, frame: FrameType | None) -> None:
        (out / f"term_{rank}").touch()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    (out / f"ready_{rank}").touch()
    time.sleep(120)


if __name__ == "__main__":
    main()
