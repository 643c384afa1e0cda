"""ddp_worker.py's job with two tiers across ranks: each rank's run directory is ``$NODE_DIR`` (a
node-local disk of its own), and RUN_DIR, the worker's first argument, is the ``mirror_to`` bucket.

    tiers_worker.py MIRROR_URL OUT_DIR STEPS [ddp_worker options]

With ``PAUSE_AT=<step>`` each rank, after reporting that step, waits until the save of that step is
committed locally and in the mirror, prints ``MIRRORED <step>`` and then waits to be killed.
With ``PRIVATE_NODE_DIR=<dir>`` the rank runs in a mount namespace of its own where ``<dir>`` is
bind-mounted on ``$NODE_DIR``: the same path as the other ranks', another directory (another node's
disk); exits 3 where that is not permitted.  With ``NO_MIRROR=1`` the manager has no ``mirror_to``;
its construction's error is printed as ``RAISED <type>: <message>`` (exit 0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any

import unbroken
from tests.distributed import ddp_worker

_Manager = unbroken.CheckpointManager


class _Tiered(_Manager):  # type: ignore[misc,valid-type]
    def __init__(self, run_dir: str, state: Any, **options: Any) -> None:
        if os.environ.get("NO_MIRROR"):
            try:
                super().__init__(os.environ["NODE_DIR"], state, **options)
            except unbroken.UnbrokenError as exc:
                print(f"RAISED {type(exc).__name__}: {exc}", flush=True)
                os._exit(0)  # the job has no checkpointing: nothing else to test
        else:
            super().__init__(os.environ["NODE_DIR"], state, mirror_to=run_dir, **options)

    def step(self, step: int, metrics: Any = None) -> bool:
        started = super().step(step, metrics)
        if step == int(os.environ.get("PAUSE_AT", "-1")):
            self.wait()
            self._mirror.wait()
            print(f"MIRRORED {step}", flush=True)
            time.sleep(600)  # until the test kills this rank
        return started


def _private_mount() -> None:
    """Re-run this rank in a mount namespace where PRIVATE_NODE_DIR is mounted on NODE_DIR."""
    source, target = os.environ.pop("PRIVATE_NODE_DIR"), os.environ["NODE_DIR"]
    os.makedirs(source, exist_ok=True)
    os.makedirs(target, exist_ok=True)
    if shutil.which("unshare") is None:
        sys.exit(3)
    script = 'mount --bind "$0" "$1" || exit 3; shift; exec "$@"'
    sys.exit(subprocess.call(["unshare", "-m", "--propagation", "private", "sh", "-c", script, source, target,
                              sys.executable, *sys.argv]))


if __name__ == "__main__":
    if os.environ.get("PRIVATE_NODE_DIR"):
        _private_mount()
    unbroken.CheckpointManager = _Tiered  # type: ignore[misc]  # ddp_worker builds its manager through this name
    sys.exit(ddp_worker.main())
