"""Real SIGKILLs of a process that is saving: committed checkpoints are never damaged or half-visible."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import unbroken

CHILD = textwrap.dedent("""
    import sys, torch, unbroken
    run, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = {"big": torch.zeros(16 * 1024 * 1024), "small": [torch.zeros(3) for _ in range(50)], "step": 0}
    ckpt = unbroken.CheckpointManager(run, state, every_steps=1, keep_last=2, save_on_close=False)
    start = ckpt.restore()
    print("start", start, flush=True)
    for step in range(start + 1, last + 1):
        state["big"].fill_(float(step))       # the content says which step it belongs to
        for t in state["small"]:
            t.fill_(float(step))
        state["step"] = step
        ckpt.step(step)
        print("saved", step, flush=True)
""")


def launch(script: Path, run: Path, last: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), str(run), "0", str(last)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def check_run_directory(run: Path) -> int:
    """Every listed checkpoint verifies and holds exactly its own step's data; the newest step."""
    records = unbroken.list_checkpoints(run, verify=True)
    assert all(r.valid for r in records), [r.problem for r in records if not r.valid]
    for record in records:
        state = {"big": torch.empty(16 * 1024 * 1024), "small": [torch.empty(3) for _ in range(50)], "step": -1}
        unbroken.load(record.path, state, rng=False)
        assert state["step"] == record.step
        assert bool((state["big"] == record.step).all()) and all(bool((t == record.step).all()) for t in state["small"])
    return records[-1].step if records else 0


# Each seed is another random kill moment on the same code path; three run by default, all six with
# ``pytest -m 'slow or not slow'`` (tests/manager/test_kill_sweep.py kills at every phase deterministically).
SEEDS = [pytest.param(seed, marks=[pytest.mark.slow] if seed >= 3 else []) for seed in range(6)]


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_random_moments_during_saves(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)  # replay a failure with the same seed
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    proc = launch(script, run, last=1000)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("start"), proc.stderr.read() if proc.stderr else line
    time.sleep(rng.uniform(0.05, 1.5))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    newest = check_run_directory(run)
    assert newest >= 0
    # The next run resumes from the newest committed checkpoint and commits further steps.
    again = subprocess.run([sys.executable, str(script), str(run), "0", str(newest + 2)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"start {newest}" in again.stdout
    assert check_run_directory(run) == newest + 2
    assert not [p for p in run.iterdir() if p.name.startswith((".staging-", ".trash-"))]
