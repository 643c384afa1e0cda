"""ddp_worker.py's job with two tiers across ranks: each rank's run directory is ``$NODE_DIR`` (a
node-local disk of its own), and RUN_DIR, the worker's first argument, is the ``mirror_to`` bucket.

    tiers_worker.py MIRROR_URL OUT_DIR STEPS [ddp_worker options]

With ``PAUSE_AT=<step>`` each rank, after reporting that step, waits until the save of that step is
committed locally and in the mirror, prints ``MIRRORED <step>`` and then waits to be killed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import unbroken
from tests.distributed import ddp_worker

_Manager = unbroken.CheckpointManager


class _Tiered(_Manager):  # type: ignore[misc,valid-type]
    def __init__(self, run_dir: str, state: Any, **options: Any) -> None:
        super().__init__(os.environ["NODE_DIR"], state, mirror_to=run_dir, **options)

    def step(self, step: int, metrics: Any = None) -> bool:
        started = super().step(step, metrics)
        if step == int(os.environ.get("PAUSE_AT", "-1")):
            self.wait()
            self._mirror.wait()
            print(f"MIRRORED {step}", flush=True)
            time.sleep(600)  # until the test kills this rank
        return started


if __name__ == "__main__":
    unbroken.CheckpointManager = _Tiered  # type: ignore[misc]  # ddp_worker builds its manager through this name
    sys.exit(ddp_worker.main())
