"""Start-up cost of the command line: what a user waits for before `unbroken` does anything.

    .venv/bin/python bench/startup.py [--repeats 7] [--compare-src OTHER/src [--compare-label NAME]] [--record]

Each round runs, interleaved, in fresh processes: the floor (``python -c pass``), what the CLI
avoids (``python -c "import torch"``), and ``unbroken run --help``, ``ls RUN``, ``verify CKPT`` and
``show CKPT`` of a local run of two small checkpoints made beforehand.  With ``--compare-src`` the
four commands also run from another source tree (``PYTHONPATH=OTHER/src``, e.g. a checkout of an
older commit) in the same rounds, so both sets of figures share the machine's load.  Reports the
median and min-max wall seconds per command; ``--record`` appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_run(run: Path) -> Path:
    """Two committed checkpoints of a small model (4 MiB of tensors) in ``run``; the newest one."""
    code = ("import torch, unbroken\n"
            "m = torch.nn.Linear(1024, 1024)\n"
            f"for s in (1, 2): unbroken.save({str(run)!r} + f'/step_{{s:09d}}', {{'model': m}}, step=s)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    return run / "step_000000002"


def commands(run: Path, ckpt: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "unbroken.cli"]
    return {"run --help": [*cli, "run", "--help"], "ls RUN": [*cli, "ls", str(run)],
            "verify CKPT": [*cli, "verify", str(ckpt)], "show CKPT": [*cli, "show", str(ckpt)]}


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(repeats: int, compare_src: str | None, compare_label: str) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        ckpt = make_run(run)
        here = dict(os.environ)
        cases: list[tuple[str, list[str], dict[str, str]]] = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"], here),
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"], here)]
        cases += [(f"unbroken {name}", argv, here) for name, argv in commands(run, ckpt).items()]
        if compare_src is not None:
            other = dict(here, PYTHONPATH=os.path.abspath(compare_src))
            cases += [(f"unbroken {name} [{compare_label}]", argv, other) for name, argv in commands(run, ckpt).items()]
        times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        for _ in range(repeats):  # interleaved: every command sees the same moments of machine load
            for label, argv, env in cases:
                times[label].append(timed(argv, env))
    return times


def table(times: dict[str, list[float]]) -> str:
    lines = ["| command | median (s) | min-max (s) |", "|---|---|---|"]
    for label, values in times.items():
        lines.append(f"| `{label}` | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare-src", help="another source tree to time in the same rounds (PYTHONPATH)")
    parser.add_argument("--compare-label", help="how the table names that tree (default: its path)")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    result = table(measure(args.repeats, args.compare_src, args.compare_label or args.compare_src or ""))
    print(result)
    if args.record:
        command = shlex.join(["bench/startup.py", *sys.argv[1:]])
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write(f"\n## CLI start-up\n\n```\n.venv/bin/python {command}\n```\n\n"
                      f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
                      f"{args.repeats} interleaved rounds, fresh processes:\n\n{result}\n")


if __name__ == "__main__":
    main()
