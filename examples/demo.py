"""`make demo`: watch a training run get SIGKILLed, resume, and finish bit-exact.

In a fresh temporary directory this script

  1. trains an example to the end without interruption (the reference);
  2. trains it again and kills it with SIGKILL at a random step (no chance to clean up, exactly
     like a power cut or a pre-empted node);
  3. runs the very same command again, which resumes from the newest valid checkpoint and finishes;
  4. compares the two final checkpoints: every tensor byte for byte, the manifests' state trees,
     and the loss printed at every step after the resume point.

It prints a short report and exits 0 if everything matches ("bit-exact: YES"), 1 otherwise.

    python examples/demo.py                       # gpt_pretrain, random kill point
    python examples/demo.py --example plain_loop --seed 7   # replay a given kill point
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = ["gpt_pretrain", "plain_loop", "consistency_distill"]
STEP_LINE = re.compile(r"^step (\d+) loss (\S+)$")
RESUME_LINE = re.compile(r"^resumed from step (\d+)$")
TIMEOUT_S = 120


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--example", choices=EXAMPLES, default="gpt_pretrain")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-interval", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="picks the kill point (default: random)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args(argv)


# ------------------------------------------------------------------------ running the example


def parse(stdout: str):
    resumed, losses = None, {}
    for line in stdout.split("\n")[:-1]:  # complete lines only
        if m := RESUME_LINE.match(line):
            resumed = int(m[1])
        elif m := STEP_LINE.match(line):
            losses[int(m[1])] = m[2]
    return resumed, losses


def run(cmd, kill_after=None, delay_s=0.0):
    """Run ``cmd``; with ``kill_after``, SIGKILL it ``delay_s`` after it prints that step (or the first
    one after it).  Returns (the step it resumed from, {step: loss} of every step it printed, the step
    whose line triggered the kill or None).  The child keeps training during ``delay_s``, so the
    lines read after the kill may go past the trigger step."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        watchdog = threading.Timer(TIMEOUT_S, proc.kill)
        watchdog.start()
        lines, trigger = [], None
        try:
            for line in proc.stdout:
                lines.append(line)
                m = STEP_LINE.match(line.rstrip("\n"))
                if kill_after is not None and m and int(m[1]) >= kill_after:
                    trigger = int(m[1])
                    time.sleep(delay_s)
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            lines.append(proc.stdout.read())
            rc = proc.wait()
        finally:
            watchdog.cancel()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read()
    expected = -signal.SIGKILL if kill_after is not None else 0
    if rc != expected:
        sys.exit(f"demo: {' '.join(cmd)} ended with status {rc} (expected {expected})\n"
                 f"{''.join(lines)[-2000:]}\n{stderr[-4000:]}")
    return (*parse("".join(lines)), trigger)


# ------------------------------------------------------------------------ comparing checkpoints


def read_tensors(path: Path) -> dict[str, tuple[str, list, bytes]]:
    """name -> (dtype, shape, raw bytes). Uses the safetensors package when it is installed, or
    else reads the (simple, documented) format directly: u64 header size, JSON header, data."""
    try:
        import torch
        from safetensors import safe_open
    except ImportError:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
                for k, v in header.items()}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k).contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            out[k] = (str(t.dtype), list(t.shape), raw)
    return out


def tree_diff(a, b, path="state"):
    if type(a) is not type(b):
        return [f"{path}: {a!r} vs {b!r}"]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())} not in both"]
        return [d for k in a for d in tree_diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_diff(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def compare(ref_ckpt: Path, ckpt: Path):
    """Returns (tensors compared, differences) between two checkpoint directories."""
    diffs = []
    for d in (ref_ckpt, ckpt):
        if not (d / "manifest.json").is_file():
            return 0, [f"missing checkpoint {d}"]
    ma = json.loads((ref_ckpt / "manifest.json").read_text())
    mb = json.loads((ckpt / "manifest.json").read_text())
    diffs += tree_diff(ma.get("step"), mb.get("step"), "step")
    diffs += tree_diff(ma.get("state"), mb.get("state"))
    files = sorted(p.name for p in ref_ckpt.glob("*.safetensors"))
    if files != sorted(p.name for p in ckpt.glob("*.safetensors")):
        diffs.append("the two checkpoints hold different tensor files")
    compared = 0
    for name in files:
        ta, tb = read_tensors(ref_ckpt / name), read_tensors(ckpt / name)
        if ta.keys() != tb.keys():
            diffs.append(f"{name}: tensor names differ: {sorted(ta.keys() ^ tb.keys())[:10]}")
        for k in sorted(ta.keys() & tb.keys()):
            compared += 1
            if ta[k] != tb[k]:
                diffs.append(f"{name}:{k}: differs ({ta[k][0]}{ta[k][1]} vs {tb[k][0]}{tb[k][1]})")
    return compared, diffs


# ------------------------------------------------------------------------ the demo


def kill_report(trigger: int, delay_ms: float, last: int) -> str:
    """What is known about the kill: when it was sent (``delay_ms`` after the child printed step
    ``trigger``) and the last step the child printed before it died (``last``, which may be later:
    the child kept training during the delay)."""
    return (f"killed with SIGKILL {delay_ms} ms after it printed step {trigger}; "
            f"the last step it printed was {last}")


def main(argv=None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10_000)
    rng = random.Random(seed)
    lo = min(2 * args.save_interval, args.steps - 1)
    kill_step = rng.randint(lo, args.steps - 1)
    delay_ms = round(rng.uniform(0, 30), 1)

    tmp = tempfile.mkdtemp(prefix="unbroken-demo-")
    try:
        return demo(args, Path(tmp), seed, kill_step, delay_ms)
    finally:
        if args.keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def demo(args, tmp: Path, seed: int, kill_step: int, delay_ms: float) -> int:
    script = HERE / f"{args.example}.py"

    def cmd(run_dir):
        return [sys.executable, str(script), "--run-dir", str(run_dir), "--steps", str(args.steps),
                "--save-interval", str(args.save_interval)]

    print(f"unbroken demo: {script.name}, {args.steps} steps, a checkpoint every "
          f"{args.save_interval} steps (replay with --seed {seed})")
    t0 = time.time()
    _, ref_losses, _ = run(cmd(tmp / "reference"))
    print(f"  1. uninterrupted run:  {len(ref_losses)} steps in {time.time() - t0:.1f} s")

    _, killed_losses, trigger = run(cmd(tmp / "crashy"), kill_after=kill_step, delay_s=delay_ms / 1000)
    print(f"  2. second run:         {kill_report(trigger, delay_ms, max(killed_losses, default=0))}")

    resumed_from, resumed_losses, _ = run(cmd(tmp / "crashy"))
    print(f"  3. same command again: resumed from step {resumed_from}, "
          f"finished step {max(resumed_losses, default=resumed_from)}")

    ref_ckpt = tmp / "reference" / f"step_{args.steps:09d}"
    ckpt = tmp / "crashy" / f"step_{args.steps:09d}"
    compared, diffs = compare(ref_ckpt, ckpt)
    printed = {**killed_losses, **resumed_losses}
    loss_diffs = [f"step {s}: loss {v} vs uninterrupted {ref_losses.get(s)}"
                  for s, v in sorted(printed.items()) if ref_losses.get(s) != v]
    if resumed_from is None or sorted(resumed_losses) != list(range(resumed_from + 1, args.steps + 1)):
        diffs.append(f"the resumed run printed steps {sorted(resumed_losses)}")
    print(f"  4. final checkpoints (step {args.steps}): {compared} tensors compared byte for byte, "
          f"manifest state trees compared, {len(resumed_losses)} loss lines after the resume "
          f"point compared")

    problems = diffs + loss_diffs
    if problems or compared == 0:
        print("bit-exact: NO")
        for p in problems[:40]:
            print(f"     {p}")
        return 1
    print("bit-exact: YES  (the interrupted run is indistinguishable from the uninterrupted one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
