"""The kill sweep: SIGKILL a real training process at chosen failpoints inside its saves, resume, check.

A reference run records the state digest of every step and, through ``UNBROKEN_FAILPOINT_TRACE``,
the sequence of failpoints its saves pass (staging, each file create/write/fsync, manifest, commit
rename and fsync, retention deletes).  Each kill point is an index into that sequence, chosen from a
seed so a failure replays exactly; the process is killed with SIGKILL by itself at that point
(``UNBROKEN_FAILPOINT="*:<i>:kill"``).  Then a fresh process resumes and we check:

* lost committed checkpoints: ``restore()`` returns a step older than one the killed run had
  already reported committed (after the commit's directory fsync);
* corrupt restores: the restored state's digest differs from the reference digest of that step;
* debris: staging or trash areas left after ``restore()``;
* continuation: the resumed run's final state differs from the uninterrupted run's.

Used by tests/manager/test_kill_sweep.py (a sample, in CI) and bench/kill_sweep.py (>= 200 points).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TRAINER = Path(__file__).with_name("sweep_train.py")
TOTAL_STEPS = 12
TIMEOUT = 180


@dataclass(frozen=True)
class Reference:
    mode: str
    digests: dict[int, str]
    final: str
    points: list[str]  # the failpoints an uninterrupted run passes, in order
    steps: int = TOTAL_STEPS


@dataclass
class Outcome:
    index: int
    point: str
    killed: bool
    committed_before_kill: int
    restored: int
    lost_commit: bool
    corrupt_restore: bool
    debris: int
    final_matches: bool
    problems: list[str] = field(default_factory=list)


def _run(run_dir: Path, mode: str, steps: int, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_FAILPOINT")}
    env.update(env_extra)
    return subprocess.run([sys.executable, str(TRAINER), str(run_dir), mode, str(steps)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _events(stdout: str, kind: str) -> list[list[str]]:
    return [line.split()[1:] for line in stdout.splitlines() if line.startswith(kind + " ")]


def reference_run(workdir: Path, mode: str, steps: int = TOTAL_STEPS) -> Reference:
    trace = workdir / f"trace-{mode}"
    done = _run(workdir / f"reference-{mode}", mode, steps, {"UNBROKEN_FAILPOINT_TRACE": str(trace)})
    if done.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{done.stderr}")
    digests = {int(s): d for s, d in _events(done.stdout, "DIGEST")}
    final = _events(done.stdout, "DONE")[0][0]
    return Reference(mode, digests, final, trace.read_text().split(), steps)


def choose_points(reference: Reference, count: int, seed: int) -> list[int]:
    """``count`` 1-based indices into the reference's failpoints, spread over every kind of point."""
    rng = random.Random(seed)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for index, point in enumerate(reference.points, start=1):
        by_kind[point].append(index)
    for indices in by_kind.values():
        rng.shuffle(indices)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    chosen: list[int] = []
    while len(chosen) < min(count, len(reference.points)):
        for kind in kinds:
            if by_kind[kind] and len(chosen) < count:
                chosen.append(by_kind[kind].pop())
    return chosen


def kill_and_resume(workdir: Path, reference: Reference, index: int) -> Outcome:
    run_dir = workdir / f"{reference.mode}-{index:05d}"
    killed = _run(run_dir, reference.mode, reference.steps, {"UNBROKEN_FAILPOINT": f"*:{index}:kill"})
    committed = [int(s[0]) for s in _events(killed.stdout, "COMMITTED")]
    resumed = _run(run_dir, reference.mode, reference.steps, {})
    outcome = Outcome(index=index, point=reference.points[index - 1], killed=killed.returncode == -signal.SIGKILL,
                      committed_before_kill=max(committed, default=0), restored=-1, lost_commit=False,
                      corrupt_restore=False, debris=0, final_matches=False)
    if not outcome.killed:
        outcome.problems.append(f"not killed at point {index} (exit {killed.returncode}): {killed.stderr[-2000:]}")
    if resumed.returncode != 0:
        outcome.problems.append(f"resume failed (exit {resumed.returncode}): {resumed.stderr[-2000:]}")
        return outcome
    step, restored_digest, debris = _events(resumed.stdout, "RESTORED")[0]
    outcome.restored, outcome.debris = int(step), int(debris)
    outcome.lost_commit = outcome.restored < outcome.committed_before_kill
    outcome.corrupt_restore = outcome.restored > 0 and restored_digest != reference.digests[outcome.restored]
    outcome.final_matches = _events(resumed.stdout, "DONE")[0][0] == reference.final
    if outcome.lost_commit:
        outcome.problems.append(f"restored step {outcome.restored} but step {outcome.committed_before_kill} "
                                "had been committed")
    if outcome.corrupt_restore:
        outcome.problems.append(f"restored step {outcome.restored} differs from what was saved")
    if outcome.debris:
        outcome.problems.append(f"{outcome.debris} staging/trash areas left after restore()")
    if not outcome.final_matches:
        outcome.problems.append("the resumed run did not end bitwise equal to the uninterrupted run")
    outcome.problems.extend(check_checkpoints_verify(run_dir))
    return outcome


def check_checkpoints_verify(run_dir: Path) -> list[str]:
    """Every checkpoint listed after the resumed run verifies byte for byte."""
    import unbroken  # imported late: the harness itself never needs torch

    return [f"{r.path}: {r.problem}" for r in unbroken.list_checkpoints(run_dir, verify=True) if not r.valid]
