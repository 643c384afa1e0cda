"""Launching real multi-process gloo jobs for the distributed tests: one process per rank, the
torchrun environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE), timeouts everywhere so a bug fails a test
instead of hanging it, and SIGKILL for crash tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def launch(script: str | Path, args: Sequence[object], world: int, logs: Path, *,
           env: dict[str, str] | None = None, rank_env: dict[int, dict[str, str]] | None = None) -> list[Rank]:
    """Start ``world`` ranks of ``script`` (stdout+stderr of rank r in ``logs/rank<r>.log``)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ranks = []
    for rank in range(world):
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_FAILPOINT")}
        full = {**inherited, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO), **(env or {}), **((rank_env or {}).get(rank, {}))}
        log = logs / f"rank{rank}.log"
        out = log.open("a")
        proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=full, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out.close()
        ranks.append(Rank(rank, proc, log))
    return ranks


def kill_all(ranks: Sequence[Rank]) -> None:
    for r in ranks:
        if r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGKILL)
    for r in ranks:
        r.proc.wait(timeout=30)


def wait_all(ranks: Sequence[Rank], timeout: float) -> list[int]:
    """Every rank's exit status; kills them all and fails if they run past ``timeout``."""
    deadline = time.monotonic() + timeout
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_all(ranks)
            dump = "\n".join(f"--- rank {x.rank} ---\n{x.output()[-3000:]}" for x in ranks)
            raise AssertionError(f"ranks still running after {timeout} s (a hang):\n{dump}") from None
    return [r.proc.returncode for r in ranks]


def run_ok(script: str | Path, args: Sequence[object], world: int, logs: Path, timeout: float = 120, **kw: object
           ) -> list[Rank]:
    ranks = launch(script, args, world, logs, **kw)  # type: ignore[arg-type]
    codes = wait_all(ranks, timeout)
    if any(codes):
        dump = "\n".join(f"--- rank {x.rank} (exit {c}) ---\n{x.output()[-4000:]}" for x, c in zip(ranks, codes))
        raise AssertionError(f"a rank failed:\n{dump}")
    return ranks


def wait_for(ranks: Sequence[Rank], marker: str, timeout: float) -> None:
    """Until rank 0's log holds ``marker`` (a rank failing meanwhile fails the test)."""
    deadline = time.monotonic() + timeout
    while marker not in ranks[0].output():
        if any(r.proc.poll() not in (None, 0) for r in ranks) or time.monotonic() > deadline:
            kill_all(ranks)
            dump = "\n".join(f"--- rank {x.rank} ---\n{x.output()[-3000:]}" for x in ranks)
            raise AssertionError(f"never saw {marker!r}:\n{dump}")
        time.sleep(0.02)
