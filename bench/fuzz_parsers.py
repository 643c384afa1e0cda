"""The long fuzz run of the manifest and safetensors-header parsers (the CI run does 200 per test).

    .venv/bin/python bench/fuzz_parsers.py --examples 20000

Runs every ``fuzz`` test of tests/format with that many randomized hypothesis examples each: random
bytes, byte mutations of valid headers/manifests, and JSON-value mutations of every field.  The
property checked: each input is either accepted as valid (and then consistent) or refused with
``CorruptCheckpointError``; never another exception, a hang, a large allocation or code execution.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000, help="hypothesis examples per fuzz test")
    args = parser.parse_args()
    env = {**os.environ, "UNBROKEN_FUZZ_EXAMPLES": str(args.examples)}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "0",
                           "-k", "fuzz", "tests/format", "--hypothesis-show-statistics"], cwd=ROOT, env=env)
    print(f"{args.examples} examples per fuzz test, exit {done.returncode}, {time.time() - started:.0f} s")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
