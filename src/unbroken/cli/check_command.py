"""``unbroken check [--steps N] [--kill-at K[,K2...]] [--keep] -- COMMAND ...``: prove that a training
command resumes bit-exactly, or show where it does not.

1. COMMAND runs twice, uninterrupted, each in a fresh temporary run directory; when the two differ
   the script is not deterministic, and no resume can match it: that is said, with the first
   differing step and metric, the first differing tensor, and the usual causes.
2. For each K it runs killed (SIGKILL) right after step K, at a random durable point of the save
   window when a save is in flight, then again in the same run directory to resume; the final
   checkpoints are compared tensor by tensor (:func:`unbroken.diff`) and the metrics passed to
   ``step()`` step by step against the uninterrupted run.  Default K: a step between two saves and
   a step that starts a save, taken from the first run.

The command reaches unbroken through the environment its CheckpointManager honours
(``unbroken.manager.check_hooks``).  Exit status: 0 bitwise identical; 1 not (the script is not
deterministic, or its resume is not exact); 2 bad usage, or the command failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbroken.cli.check_runner import CommandFailed, Run, Runner

if TYPE_CHECKING:
    from unbroken.cli.check_verdict import Verdict

__all__ = ["add_check"]

EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2


def add_check(sub: Any) -> None:
    check = sub.add_parser(
        "check", help="prove that a training command resumes bit-exactly (kill it, resume it, compare)",
        usage="unbroken check [--steps N] [--kill-at K[,K2...]] [--keep] [--keep-threads] -- COMMAND [ARGS...]",
        description="Run COMMAND twice uninterrupted, then killed at step K and resumed, each in a fresh temporary "
                    "run directory (UNBROKEN_RUN_DIR replaces the directory the script gives its CheckpointManager), "
                    "and compare the final checkpoints tensor by tensor and the metrics passed to step() step by "
                    "step. The script must create one CheckpointManager, call restore() and report every step.",
        epilog="Exit status: 0 bitwise identical; 1 not (with the first differing step and state entry, and hints); "
               "2 bad options, or the command failed. Children run with OMP_NUM_THREADS=1 (a BLAS whose thread "
               "count follows the machine's load sums in another order from run to run); --keep-threads leaves it.")
    check.add_argument("--steps", type=_positive, metavar="N",
                       help="end each run after step N (UNBROKEN_CHECK_STEPS: the manager saves step N and exits 0; "
                            "code after the training loop does not run). Default: the script's own length")
    check.add_argument("--kill-at", type=_steps, metavar="K[,K2...]",
                       help="the steps to kill at (default: one between two saves and one that starts a save)")
    check.add_argument("--keep", action="store_true", help="keep the temporary run directories and logs; "
                                                           "their path is printed")
    check.add_argument("--keep-threads", action="store_true",
                       help="do not set OMP_NUM_THREADS=1 for the command (check with your own thread settings)")
    check.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after '--'")
    check.set_defaults(run=_check)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a step number >= 1")
    return int(text)


def _steps(text: str) -> list[int]:
    return sorted({_positive(part.strip()) for part in text.split(",")})


def _check(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: no command to check: unbroken check [options] -- python train.py ARGS...", file=sys.stderr)
        return EXIT_USAGE
    workdir = Path(tempfile.mkdtemp(prefix="unbroken-check-"))
    try:
        return _prove(Runner(command, workdir, args.steps, not args.keep_threads), args.kill_at)
    except CommandFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if args.keep:
            print(f"kept: {workdir} (run directories, <run>.jsonl logs, <run>.out/.err output)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _prove(runner: Runner, kill_at: list[int] | None) -> int:
    # Imported here: the comparison needs torch, which the CLI's start-up never imports (cli/main.py).
    from unbroken.cli.check_verdict import compare_repeat, compare_resume, unused_streams

    first = _timed(runner, "uninterrupted-1")
    saves = sorted(first.saves)
    print(f"uninterrupted run: {len(first.steps)} steps ({min(first.steps)}..{max(first.steps)}), "
          f"saves at {_list(saves)}")
    second = _timed(runner, "uninterrupted-2")
    unused = unused_streams(first, second)
    if unused:
        print(f"RNG streams never drawn from, not compared: {', '.join(sorted(unused))} (unseeded, they differ "
              "from run to run and cannot change a result)")
    repeat = compare_repeat(first, second, _diff(first, second, unused))
    if not _report("a second uninterrupted run", repeat):
        print("NOT DETERMINISTIC: fix this first; a resume cannot match a run that does not match itself")
        return EXIT_DIFFERENT
    last = max(first.steps)
    points = kill_at if kill_at is not None else _default_kills(sorted(first.steps), saves)
    bad = [k for k in points if k not in first.steps or k >= last]
    if bad:
        raise CommandFailed(f"--kill-at {_list(bad)}: a kill step must be one the command reports, before its last "
                            f"({last}); it reports {min(first.steps)}..{last}")
    if not points:
        raise CommandFailed(f"the command reports steps {min(first.steps)}..{last} only: nothing to kill between")
    exact = True
    for k in points:
        killed = _timed(runner, f"kill-{k}", kill_at=k)
        resumed = _timed(runner, f"resume-{k}", run_dir=killed.run_dir)
        if not any(r.get("event") == "restore" for r in resumed.records):
            raise CommandFailed("the command never calls restore() on its CheckpointManager: a run started again "
                                "starts from step 0, there is no resume to check (call start = ckpt.restore() "
                                "before the training loop and continue from `start`)")
        where = _kill_description(killed.kill)
        exact = _report(f"killed at step {k} {where}, resumed from step {resumed.restored}",
                        compare_resume(first, killed, resumed, _diff(first, resumed, unused), unused)) and exact
    print("resume is EXACT: bitwise identical after every kill" if exact else "resume is NOT exact")
    return EXIT_IDENTICAL if exact else EXIT_DIFFERENT


def _timed(runner: Runner, name: str, **options: Any) -> Run:
    started = time.monotonic()
    run = runner.run(name, **options)
    print(f"  ran {name} ({time.monotonic() - started:.1f} s)", flush=True)
    return run


def _diff(a: Run, b: Run, unused_rng: set[str]) -> Any:
    import unbroken
    from unbroken.cli.check_verdict import without_streams

    return without_streams(unbroken.diff(a.run_dir, b.run_dir), unused_rng)


def _report(what: str, verdict: Verdict) -> bool:
    if verdict.identical:
        print(f"{what}: identical (final checkpoint bitwise equal, every metric equal)")
        return True
    print(f"{what}: DIFFERENT")
    for line in (*verdict.findings, *verdict.hints):
        print(f"  {line}")
    return False


def _default_kills(steps: list[int], saves: list[int]) -> list[int]:
    """A step between two saves (so the resume starts from a checkpoint) and a step that starts a save
    other than the last one (a kill inside its window)."""
    last = steps[-1]
    inner = [s for s in saves if s < last]
    kills = []
    unsaved = [s for s in steps if s not in saves and s < last]
    between = [s for s in unsaved if len(inner) >= 2 and inner[0] < s < inner[1]] or [
        s for s in unsaved if inner and s > inner[0]] or unsaved
    if between:
        kills.append(between[len(between) // 2])
    if inner:
        kills.append(inner[1] if len(inner) >= 2 else inner[0])
    return sorted(set(kills))


def _kill_description(kill: dict[str, Any] | None) -> str:
    if kill is None:
        return ""
    if kill.get("point"):
        return f"(inside a save, at its durable point {kill['point']})"
    return "(a save in flight had just committed)" if kill.get("during_save") else "(no save in flight)"


def _list(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"
