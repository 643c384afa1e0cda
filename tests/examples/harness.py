"""Run the examples as real processes, SIGKILL them, and compare their checkpoints bit for bit.

The comparison deliberately uses no code of unbroken: tensors are read with the reference
safetensors reader and manifests with ``json``, so a bug in our reader cannot hide one in our
writer.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO / "examples"
STEP_LINE = re.compile(r"^step (\d+) loss (\S+)$")
RESUME_LINE = re.compile(r"^resumed from step (\d+)$")


@dataclass
class RunOutput:
    """What one process printed: the resume point and the loss line of every completed step."""

    returncode: int
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    resumed_from: int | None = None
    losses: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def last_step(self) -> int | None:
        return max(self.losses) if self.losses else None

    def describe(self) -> str:
        return (f"rc={self.returncode} resumed_from={self.resumed_from} last_step={self.last_step}\n"
                f"--- stdout (tail) ---\n{self.stdout[-1500:]}\n--- stderr (tail) ---\n"
                f"{self.stderr[-3000:]}")


def parse_output(returncode: int, stdout: str, stderr: str) -> RunOutput:
    out = RunOutput(returncode, stdout, stderr)
    # Only complete lines count: a kill may in principle cut the very last one.
    complete = stdout.split("\n")[:-1]
    for line in complete:
        if m := RESUME_LINE.match(line):
            out.resumed_from = int(m[1])
        elif m := STEP_LINE.match(line):
            step = int(m[1])
            assert step not in out.losses, f"step {step} printed twice in one run"
            out.losses[step] = m[2]
    return out


def example_command(example: str, run_dir: Path, steps: int, save_interval: int,
                    *extra: str) -> list[str]:
    return [sys.executable, str(EXAMPLES_DIR / f"{example}.py"), "--run-dir", str(run_dir),
            "--steps", str(steps), "--save-interval", str(save_interval), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_to_end(cmd: list[str], timeout: float) -> RunOutput:
    """Run a command to completion (it must succeed within ``timeout`` seconds)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=REPO)
    out = parse_output(proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed\n{out.describe()}"
    return out


def run_and_kill(cmd: list[str], after_step: int, delay_s: float, timeout: float) -> RunOutput:
    """Start ``cmd``; once it prints the line of ``after_step``, wait ``delay_s`` and SIGKILL it.

    The loss line is printed just before ``ckpt.step()``, so a small delay lands the kill inside
    the save of that step when it is due.
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(),
                                cwd=REPO)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        chunks, killed = [], False
        try:
            for line in proc.stdout:
                chunks.append(line)
                m = STEP_LINE.match(line.rstrip("\n"))
                if m and int(m[1]) >= after_step:
                    time.sleep(delay_s)
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
            chunks.append(proc.stdout.read())  # whatever it printed before dying
            rc = proc.wait(timeout=timeout)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        out = parse_output(rc, "".join(chunks), err.read())
    assert killed and rc == -signal.SIGKILL, (
        f"{' '.join(cmd)} was meant to be killed after step {after_step} but was not "
        f"(timeout {timeout}s?)\n{out.describe()}")
    return out


@dataclass(frozen=True)
class KillPlan:
    """Where to kill: steps after whose loss line a SIGKILL is sent, and the delay (ms) after it.

    Derived only from ``seed``, so the seed in a failing test's id replays the same kills.
    """

    seed: int
    steps: tuple[int, ...]
    delays_ms: tuple[float, ...]

    @classmethod
    def make(cls, seed: int, total: int, save_interval: int, kills: int = 1) -> KillPlan:
        rng = random.Random(seed)
        lo = 2 * save_interval  # late enough that at least one checkpoint is committed
        width = (total - lo) // kills
        assert width >= 1, "too few steps for this many kills"
        steps, delays = [], []
        for i in range(kills):
            a, b = lo + i * width, lo + (i + 1) * width - 1
            step = rng.randint(a, b)
            if rng.random() < 0.5:  # half the time: right where a save is due
                snapped = step - step % save_interval
                step = snapped if snapped >= a else step
            steps.append(step)
            delays.append(round(rng.uniform(0.0, 30.0), 1))
        return cls(seed, tuple(steps), tuple(delays))

    def __str__(self) -> str:
        kills = ", ".join(f"after step {s} + {d} ms" for s, d in zip(self.steps, self.delays_ms))
        return f"kill plan seed={self.seed}: {kills}"


# ---------------------------------------------------------------- checkpoint comparison


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:09d}"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that equality is bitwise (NaN payloads, -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def compare_tensor_files(a: Path, b: Path) -> tuple[int, list[str]]:
    """Compare every tensor of two safetensors files; returns (tensors compared, differences)."""
    diffs: list[str] = []
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        if ka != kb:
            diffs.append(f"{a.name}: tensor names differ: only in first {sorted(ka - kb)[:10]}, "
                         f"only in second {sorted(kb - ka)[:10]}")
        for name in sorted(ka & kb):
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            if ta.dtype != tb.dtype or ta.shape != tb.shape:
                diffs.append(f"{a.name}:{name}: {ta.dtype}{tuple(ta.shape)} vs "
                             f"{tb.dtype}{tuple(tb.shape)}")
            elif not torch.equal(_bytes(ta), _bytes(tb)):
                n = int((_bytes(ta) != _bytes(tb)).sum())
                diffs.append(f"{a.name}:{name}: {n} of {_bytes(ta).numel()} bytes differ")
        return len(ka & kb), diffs


def json_diff(a, b, path: str = "state", limit: int = 20) -> list[str]:
    """Paths where two JSON trees differ (NaN equals NaN; int 1 differs from float 1.0)."""
    out: list[str] = []

    def walk(x, y, p):
        if len(out) >= limit:
            return
        if type(x) is not type(y):
            out.append(f"{p}: {x!r} vs {y!r}")
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                out.append(f"{p}: keys {sorted(x.keys() ^ y.keys())} not in both")
            for k in x.keys() & y.keys():
                walk(x[k], y[k], f"{p}.{k}")
        elif isinstance(x, list):
            if len(x) != len(y):
                out.append(f"{p}: length {len(x)} vs {len(y)}")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{p}[{i}]")
        elif isinstance(x, float) and math.isnan(x) and math.isnan(y):
            return
        elif x != y:
            out.append(f"{p}: {x!r} vs {y!r}")

    walk(a, b, path)
    return out


def compare_checkpoints(a: Path, b: Path) -> tuple[int, list[str]]:
    """Compare two committed checkpoint directories: manifests' step and state, every tensor."""
    diffs: list[str] = []
    for d in (a, b):
        if not (d / "manifest.json").is_file():
            return 0, [f"{d} is not a committed checkpoint (no manifest.json)"]
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    if ma.get("step") != mb.get("step"):
        diffs.append(f"manifest step: {ma.get('step')} vs {mb.get('step')}")
    if "state" not in ma or "state" not in mb:
        diffs.append("manifest has no 'state' tree")
    else:
        diffs += json_diff(ma["state"], mb["state"])
    files_a = sorted(p.name for p in a.glob("*.safetensors"))
    files_b = sorted(p.name for p in b.glob("*.safetensors"))
    if files_a != files_b:
        diffs.append(f"tensor files differ: {files_a} vs {files_b}")
    if not files_a:
        diffs.append(f"no tensor files in {a}")
    compared = 0
    for name in sorted(set(files_a) & set(files_b)):
        n, d = compare_tensor_files(a / name, b / name)
        compared += n
        diffs += d
    return compared, diffs


def loss_diffs(reference: RunOutput, run: RunOutput, label: str) -> list[str]:
    """Loss lines of ``run`` that are absent from, or differ from, the uninterrupted run."""
    out = []
    for step, loss in sorted(run.losses.items()):
        ref = reference.losses.get(step)
        if ref != loss:
            out.append(f"{label}: step {step} loss {loss} vs uninterrupted {ref}")
    return out
