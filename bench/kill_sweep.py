"""The long kill sweep: SIGKILL a real training run at >= 200 failpoints inside its saves, resume, check.

    .venv/bin/python bench/kill_sweep.py --points 200 --seed 0 --jobs 2 --steps 24

Half the points kill synchronous saves, half asynchronous ones (the kill then lands on the writer
thread while training runs on).  Each point is resumed in a fresh process and checked as described
in tests/killsweep.py.  Prints a table per failpoint kind and the totals recorded in
docs/RELIABILITY.md; exits 1 if any point lost a committed checkpoint, restored corrupt state, left
debris or failed to continue bit-exactly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.killsweep import Outcome, choose_points, kill_and_resume, reference_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200, help="kill points in all (split over sync/async)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="kill/resume pairs run at once")
    parser.add_argument("--steps", type=int, default=24, help="training steps per run (a save every 2)")
    args = parser.parse_args()
    started = time.time()
    outcomes: list[tuple[str, Outcome]] = []
    with tempfile.TemporaryDirectory(prefix="kill-sweep-") as tmp:
        workdir = Path(tmp)
        for mode, count in (("sync", args.points - args.points // 2), ("async", args.points // 2)):
            reference = reference_run(workdir, mode, args.steps)
            indices = choose_points(reference, count, args.seed)
            if len(indices) < count:
                print(f"{mode}: only {len(indices)} distinct points in {args.steps} steps; use more --steps")
            with ThreadPoolExecutor(args.jobs) as pool:
                jobs = [pool.submit(kill_and_resume, workdir / f"{n:04d}", reference, i)
                        for n, i in enumerate(indices)]
                for job in jobs:
                    outcomes.append((mode, job.result()))
                    print(".", end="", flush=True)
    print()
    return report(outcomes, args, time.time() - started)


def report(outcomes: list[tuple[str, Outcome]], args: argparse.Namespace, seconds: float) -> int:
    kinds = Counter(f"{mode} {o.point}" for mode, o in outcomes)
    print(f"{'mode and failpoint':<28}{'kills':>6}")
    for kind, n in sorted(kinds.items()):
        print(f"{kind:<28}{n:>6}")
    lost = sum(o.lost_commit for _, o in outcomes)
    corrupt = sum(o.corrupt_restore for _, o in outcomes)
    debris = sum(o.debris > 0 for _, o in outcomes)
    diverged = sum(not o.final_matches for _, o in outcomes)
    not_killed = sum(not o.killed for _, o in outcomes)
    newer = sum(o.restored > o.committed_before_kill for _, o in outcomes)
    print(f"points tried: {len(outcomes)} (seed {args.seed}) in {seconds:.0f} s")
    print(f"processes not killed at their point: {not_killed}")
    print(f"lost committed checkpoints: {lost}")
    print(f"corrupt restores: {corrupt}")
    print(f"restores with staging/trash debris left: {debris}")
    print(f"resumed runs not bitwise equal to the uninterrupted run: {diverged}")
    print(f"kills after a commit was durable but before it was reported (restored a newer step): {newer}")
    for mode, o in outcomes:
        for problem in o.problems:
            print(f"PROBLEM {mode} point {o.index} ({o.point}): {problem}")
    return 1 if any(o.problems for _, o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
