"""GPU checkpoint stall and durable throughput (issue 15): run it whenever a CUDA device is lent.

    .venv/bin/python bench/gpu_bench.py [--workload G S T] [--rounds 3] [--dir /tmp] [--output FILE] [--record]
                                        [--manager-option KEY=JSON ...] [--label TEXT]

Workloads on the device (bench/workloads.py): G = 2.4 GB in 96 float32 tensors; S = 1,700 Linear(64, 64)
+ Adam (10,200 device tensors, 85 MB; Adam's 3,400 step counters stay on the CPU); T = GPT-2-small-like
(124M parameters) + AdamW, 1.49 GB.  One process; every round runs every method once, in an order
rotated by one per round; medians over rounds, ratios within a round:
  D2H floor      one pinned device-to-host copy of one preallocated device buffer holding every byte
  D2H per tensor every tensor into its own slice of one pinned host buffer (non_blocking, one sync)
  unbroken       CheckpointManager.step(): stall of the first save (fresh staging) and of the next one,
                 and the time until committed; sync unbroken.save
  DCP            async_save with one DefaultStager (pinned) reused: first and second stall; dcp.save
  torch.save     + fsync (the training thread waits for all of it)
  raw write      the host copy written with one os.write per tensor + fsync (durable floor)
  T only         a training step (bf16 autocast forward + backward + AdamW) alone and right after
                 step() started a save: the difference is what the save costs the training loop
--manager-option passes options to CheckpointManager (e.g. an overlapped-snapshot option once it exists).
Without a CUDA device the script exits (status 2) saying so; --allow-cpu runs it on the CPU only to
check the script itself, and never records.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import workloads
from benchlib import as_bytes, flat, fsync_tree, git_commit, machine, record_section, write_all

warnings.filterwarnings("ignore")  # DCP's single-process notice on every call


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class Case:
    """One workload on the device, with the host buffers and helpers every method shares."""

    def __init__(self, spec: str, device: str, out: Path, options: dict[str, Any]) -> None:
        self.spec, self.out, self.options = spec, out, options
        self.state = workloads.build(spec, device=device)
        tensors = [t for t in flat(self.state).values() if t.device.type == device]
        self.tensors, self.bytes = tensors, sum(t.numel() * t.element_size() for t in tensors)
        pin = device == "cuda"
        self.host = torch.empty(self.bytes, dtype=torch.uint8, pin_memory=pin)
        self.host.fill_(0)
        self.device_flat = torch.empty(self.bytes, dtype=torch.uint8, device=device)
        self.slices, at = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            self.device_flat[at:at + n].copy_(t.detach().reshape(-1).view(torch.uint8))
            self.slices.append(self.host[at:at + n])
            at += n
        self.count = 0

    def fresh(self, name: str) -> Path:
        self.count += 1
        return self.out / f"{self.spec}-{name}-{self.count}"

    # -- methods: each returns {field: seconds} -----------------------------------------------------------
    def d2h(self) -> dict[str, float]:
        coalesced = timed(lambda: self.host.copy_(self.device_flat, non_blocking=True))

        def per_tensor() -> None:
            for dst, t in zip(self.slices, self.tensors, strict=True):
                dst.copy_(t.detach().reshape(-1).view(torch.uint8), non_blocking=True)

        return {"d2h": coalesced, "d2h_per_tensor": timed(per_tensor)}

    def raw_write(self) -> dict[str, float]:
        path = self.fresh("raw")

        def write() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for s in self.slices:
                    write_all(fd, as_bytes(s))
                os.fsync(fd)
            finally:
                os.close(fd)

        seconds = timed(write)
        path.unlink()
        return {"raw_write": seconds}

    def unbroken_async(self) -> dict[str, float]:
        import unbroken

        mgr = unbroken.CheckpointManager(self.fresh("ub-run"), self.state, every_steps=1, capture_rng=False,
                                         save_on_close=False, **self.options)
        got: dict[str, float] = {}
        for step, name in ((1, "ub_first"), (2, "ub_stall")):
            sync()
            start = time.perf_counter()
            mgr.step(step)
            got[name] = time.perf_counter() - start
            mgr.wait()
            got["ub_commit"] = time.perf_counter() - start
        if self.spec == "T":
            got.update(self.overlap(mgr))
        mgr.close()
        return got

    def overlap(self, mgr: Any) -> dict[str, float]:
        """A training step alone, and the same step right after step() started a save."""
        model, opt = self.state["model"], self.state["optimizer"]
        idx = torch.randint(0, 50257, (4, 1024), device=self.device_flat.device)

        def train() -> None:
            with torch.autocast(self.device_flat.device.type, dtype=torch.bfloat16):
                loss = model(idx).float().logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train()
        alone = statistics.median(timed(train) for _ in range(5))
        sync()
        start = time.perf_counter()
        mgr.step(3)
        train()
        sync()
        during = time.perf_counter() - start
        mgr.wait()
        return {"train_step": alone, "train_step_with_save": during}

    def unbroken_sync(self) -> dict[str, float]:
        import unbroken

        path = self.fresh("ub")
        seconds = timed(lambda: unbroken.save(path, self.state, rng=False))
        shutil.rmtree(path)
        return {"ub_sync": seconds}

    def torch_save(self) -> dict[str, float]:
        path = self.fresh("torch.pt")

        def save() -> None:
            torch.save({k: v.state_dict() for k, v in self.state.items()}, path)
            fsync_tree(path)

        seconds = timed(save)
        path.unlink()
        return {"torch_save": seconds}

    def dcp_sync(self) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp
        from pt_methods import dcp_state

        path = self.fresh("dcp")

        def save() -> None:
            dcp.save(dcp_state(self.state), checkpoint_id=str(path))
            fsync_tree(path)

        seconds = timed(save)
        shutil.rmtree(path)
        return {"dcp_sync": seconds}

    def dcp_async(self) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp
        from pt_methods import _done, dcp_state
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        pinned = self.device_flat.device.type == "cuda"
        stager = DefaultStager(StagingOptions(pinned, False, False, False))
        got: dict[str, float] = {}
        paths = []
        for name in ("dcp_first", "dcp_stall"):
            paths.append(self.fresh("dcp-async"))
            sync()
            start = time.perf_counter()
            response = dcp.async_save(dcp_state(self.state), checkpoint_id=str(paths[-1]), async_stager=stager)
            got[name] = time.perf_counter() - start
            _done(response)
            got["dcp_commit"] = time.perf_counter() - start
        stager.close()
        for p in paths:
            shutil.rmtree(p)
        return got


METHODS = ("d2h", "raw_write", "unbroken_async", "unbroken_sync", "torch_save", "dcp_sync", "dcp_async")
ROWS = (  # (label, field, reference field or None)
    ("D2H floor: one coalesced pinned copy", "d2h", None),
    ("D2H, one pinned copy per tensor", "d2h_per_tensor", "d2h"),
    ("**unbroken step() stall**, steady", "ub_stall", "d2h"),
    ("**unbroken step() stall**, first save", "ub_first", "d2h"),
    ("DCP async_save stall, stager reused", "dcp_stall", "d2h"),
    ("DCP async_save stall, first save", "dcp_first", "d2h"),
    ("torch.save + fsync (all of it stalls)", "torch_save", "d2h"),
    ("raw write of the host bytes + fsync (durable floor)", "raw_write", None),
    ("**unbroken sync save**", "ub_sync", "raw_write"),
    ("DCP save (sync)", "dcp_sync", "raw_write"),
    ("unbroken async: until committed", "ub_commit", "raw_write"),
    ("DCP async: until committed", "dcp_commit", "raw_write"),
    ("training step alone (bf16 fwd+bwd+AdamW)", "train_step", None),
    ("training step right after step() started a save", "train_step_with_save", "train_step"),
)


def run(case: Case, rounds: int) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {}
    for r in range(rounds):
        for i in range(len(METHODS)):
            method = METHODS[(i + r) % len(METHODS)]
            for field, seconds in getattr(case, method)().items():
                got.setdefault(field, []).append(seconds)
        print(f"  {case.spec} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in got.items()),
              flush=True)
    return got


def table(case: Case, got: dict[str, list[float]]) -> str:
    lines = [f"### {workloads.describe(case.spec)}: {len(case.tensors):,} device tensors, "
             f"{workloads.gigabytes(case.bytes)}", "",
             "| measurement | median | min-max | × reference, median (min-max over rounds) |", "|---|---|---|---|"]
    for label, field, ref in ROWS:
        if field not in got:
            continue
        v = got[field]
        rel = "reference"
        if ref is not None:
            mid, lo, hi = _ratio(v, got[ref])
            rel = f"{mid:.2f}× {ref} ({lo:.2f}-{hi:.2f})"
        lines.append(f"| {label} | {statistics.median(v) * 1000:.1f} ms | {min(v) * 1000:.1f}-{max(v) * 1000:.1f} ms "
                     f"| {rel} |")
    return "\n".join(lines) + "\n"


def _ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    r = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(r), min(r), max(r)


def option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workload", nargs="+", default=["G", "S", "T"], help="G, S, T (or a sweep point such as 4k)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", help="where checkpoints are written (default: a temporary directory under /tmp)")
    p.add_argument("--manager-option", action="append", default=[], type=option, metavar="KEY=JSON")
    p.add_argument("--label", help="what the section is keyed by, after the card (default: the commit)")
    p.add_argument("--output", help="also write the markdown section to this file (e.g. $OUT/gpu.md)")
    p.add_argument("--record", action="store_true", help="replace or append this section in bench/RESULTS.md")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # checks the script, records nothing
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_bench.py: no CUDA device is visible (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of torch. "
              "Nothing was measured or recorded.", file=sys.stderr)
        raise SystemExit(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (script check only)"
    options = dict(args.manager_option)
    started = time.time()
    text = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="gpu_bench.") as tmp:
        for spec in args.workload:
            case = Case(spec, device, Path(tmp), options)
            text.append(table(case, run(case, args.rounds)))
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
    label = args.label or git_commit()
    heading = f"GPU stall and throughput: {card} at {label}"
    cuda = torch.version.cuda or "none"
    body = "\n".join([f"Command: `{shlex.join(['.venv/bin/python', 'bench/gpu_bench.py', *sys.argv[1:]])}`", "",
                      f"{card}, CUDA {cuda}; {machine()}; {args.rounds} rounds, {time.time() - started:.0f} s; "
                      f"manager options {options or 'default'}.", "", *text])
    print(f"\n## {heading}\n\n{body}")
    if args.output:
        Path(args.output).write_text(f"## {heading}\n\n{body}\n")
    if args.record and device == "cuda":
        record_section(heading, body)


if __name__ == "__main__":
    main()
