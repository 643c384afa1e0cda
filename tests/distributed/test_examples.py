"""The distributed examples run under torchrun and resume (the same world size for DDP, 2 -> 1 for FSDP2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO, free_port


def torchrun(example: str, ranks: int, run: Path, steps: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), "--master_addr", "127.0.0.1", str(REPO / "examples" / example), "--run-dir", str(run),
           "--steps", str(steps), "--save-interval", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(300)
def test_ddp_and_fsdp_examples_resume(tmp_path: Path) -> None:
    assert "resumed from step 0" in torchrun("ddp_train.py", 2, tmp_path / "ddp", 5)
    out = torchrun("ddp_train.py", 2, tmp_path / "ddp", 7)
    assert "resumed from step 5" in out and "step 7 loss" in out
    assert "step 5 loss" in torchrun("fsdp_train.py", 2, tmp_path / "fsdp", 5)
    out = torchrun("fsdp_train.py", 1, tmp_path / "fsdp", 7)
    assert "resumed from step 5" in out and "step 7 loss" in out
