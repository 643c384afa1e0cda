"""Checkpoint I/O benchmark: unbroken against the disk's limits and against the usual baselines, same run.

    .venv/bin/python bench/io_bench.py [--workload large small] [--repeats 3] [--dir bench/out] [--record]

Every measurement runs in a fresh process (so peak RSS is its own), repeated ``--repeats`` times;
the table shows medians and ratios computed from this run only:
  W  raw write bandwidth: random bytes, os.write in 16 MB chunks, fsync
  R  raw cold read bandwidth: the same file after posix_fadvise(DONTNEED)
  M  memcpy bandwidth: torch copy_ between two preallocated host tensors
  torch.save / safetensors.save_file / torch.distributed.checkpoint.save, each followed by fsync
  unbroken sync save (unbroken.save), unbroken async stall (CheckpointManager.step) and total
  training-step time without and while a background save runs
  restore cold (page cache evicted) and warm, every byte read and CRC-checked
Workloads: "large" = 4 float32 tensors of 256 MB (1 GiB); "small" = 2,000 Linear(32, 32) layers with
Adam state (about 12,000 tensors, 25 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import drop_page_cache, evict, flat, fsync_tree, nbytes, peak_rss, rss
from torch import nn

HERE = Path(__file__).resolve().parent
CHUNK = 16 << 20


# -- workloads -------------------------------------------------------------------------------------------
def build(workload: str) -> dict[str, Any]:
    torch.manual_seed(0)
    if workload == "large":  # a model whose weights are four 256 MiB matrices
        model = nn.ParameterList(nn.Parameter(torch.empty(8192, 8192).uniform_()) for _ in range(4))
        return {"model": model}
    model = nn.ModuleList(nn.Linear(32, 32) for _ in range(2000))
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return {"model": model, "optimizer": opt}


def train_step(x: torch.Tensor, w: torch.Tensor) -> None:
    for _ in range(4):
        x = torch.tanh(x @ w)


# -- one measurement per process -----------------------------------------------------------------------------
def measure(kind: str, workload: str, out: Path) -> dict[str, float]:
    import torch.distributed.checkpoint  # noqa: F401 - imports stay outside every timed region
    from safetensors.torch import save_file  # noqa: F401

    import unbroken  # noqa: F401

    state = build(workload)
    size = nbytes(state)
    base = rss()
    start = time.perf_counter()
    extra: dict[str, float] = {}
    if kind == "raw_write":
        data = torch.empty(size, dtype=torch.uint8).random_()
        view = memoryview(data.numpy())
        base = rss()
        start = time.perf_counter()
        fd = os.open(out / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for i in range(0, size, CHUNK):
            os.write(fd, view[i:i + CHUNK])
        os.fsync(fd)
        os.close(fd)
    elif kind == "raw_read":
        evict(out / "raw.bin")
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        start = time.perf_counter()
        with open(out / "raw.bin", "rb", buffering=0) as f:
            got = 0
            while got < size:
                got += f.readinto(view[got:got + CHUNK])
    elif kind == "memcpy":
        src = torch.empty(size, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        start = time.perf_counter()
        dst.copy_(src)
    elif kind == "torch_save":
        target = out / "torch.pt"
        torch.save({k: v.state_dict() for k, v in state.items()}, target)
        fsync_tree(target)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        target = out / "st.safetensors"
        save_file(flat(state), str(target))
        fsync_tree(target)
    elif kind == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save({k: v.state_dict() for k, v in state.items()}, checkpoint_id=str(out / "dcp"))
        fsync_tree(out / "dcp")
    elif kind == "ours_sync":
        import unbroken

        unbroken.save(out / "ours", state, rng=False)
    elif kind == "ours_async":
        import unbroken

        ckpt = unbroken.CheckpointManager(out / "run", state, every_steps=1, capture_rng=False, save_on_close=False)
        t0 = time.perf_counter()
        ckpt.step(1)  # the first save also allocates (and page-faults) the staging buffer
        extra["first_stall_s"] = time.perf_counter() - t0
        ckpt.wait()
        start = time.perf_counter()
        ckpt.step(2)  # every later save reuses it: the steady state of a training run
        extra["stall_s"] = time.perf_counter() - start
        ckpt.wait()
        ckpt.close()
    elif kind == "train_overlap":
        import unbroken

        x, w = torch.randn(512, 512), torch.randn(512, 512) / 23
        for _ in range(3):
            train_step(x, w)
        t0 = time.perf_counter()
        for _ in range(10):
            train_step(x, w)
        extra["step_alone_s"] = (time.perf_counter() - t0) / 10
        ckpt = unbroken.CheckpointManager(out / "overlap", state, every_steps=1, capture_rng=False,
                                          save_on_close=False)
        ckpt.step(1)
        steps, t0 = 0, time.perf_counter()
        while ckpt._saver.busy or steps < 3:
            train_step(x, w)
            steps += 1
        extra["step_during_save_s"] = (time.perf_counter() - t0) / steps
        extra["steps_during_save"] = steps
        ckpt.close()
    elif kind in ("restore_cold", "restore_warm"):
        import unbroken

        target = out / "ours"
        if kind == "restore_cold":
            evict(target)
        else:
            unbroken.load(target, state, rng=False)  # warm the page cache
            base = rss()
        start = time.perf_counter()
        unbroken.load(target, state, rng=False)
    else:
        raise SystemExit(f"unknown measurement {kind}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": size, "extra_rss": max(0, peak_rss() - base), **extra}


# -- orchestration ---------------------------------------------------------------------------------------------
ORDER = ["raw_write", "raw_read", "memcpy", "torch_save", "safetensors", "dcp", "ours_sync", "ours_async",
         "train_overlap", "restore_cold", "restore_warm"]


def run_child(kind: str, workload: str, out: Path) -> dict[str, float]:
    drop_page_cache()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--workload", workload, "--dir", str(out)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(workload: str, out: Path, repeats: int) -> dict[str, dict[str, float]]:
    results: dict[str, list[dict[str, float]]] = {k: [] for k in ORDER}
    rng = random.Random(0)
    for _ in range(repeats):
        # A shuffled order per repeat, so a slow phase of the (shared, virtual) disk does not always
        # hit the same method; each read comes after the write it reads.
        order = ORDER[3:9]
        rng.shuffle(order)
        order = ["raw_write", "raw_read", "memcpy", *order, "restore_cold", "restore_warm"]
        for target in ("torch.pt", "st.safetensors", "dcp", "ours", "run", "overlap"):
            shutil.rmtree(out / target, ignore_errors=True)
            (out / target).unlink(missing_ok=True) if (out / target).is_file() else None
        for kind in order:
            results[kind].append(run_child(kind, workload, out))
            print(f"  {workload:5s} {kind:14s} {results[kind][-1]['seconds']:.3f} s", flush=True)
    return {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in results.items()}


def table(workload: str, m: dict[str, dict[str, float]]) -> str:
    size = m["raw_write"]["bytes"]
    gb = size / 1e9
    W, R, M = gb / m["raw_write"]["seconds"], gb / m["raw_read"]["seconds"], gb / m["memcpy"]["seconds"]
    rows = [f"### Workload `{workload}`: {size / 2**20:.0f} MiB of tensors",
            "", f"Disk write W = {W:.2f} GB/s (with fsync), cold read R = {R:.2f} GB/s, memcpy M = {M:.2f} GB/s.",
            "", "| measurement | median time | throughput | vs. target | extra peak RSS |", "|---|---|---|---|---|"]

    def row(name: str, key: str, note: str, field: str = "seconds") -> None:
        t = m[key][field]
        rows.append(f"| {name} | {t * 1000:.1f} ms | {gb / t:.2f} GB/s | {note} | "
                    f"{m[key]['extra_rss'] / 2**20:.0f} MiB |")

    ours = m["ours_sync"]["seconds"]
    row("torch.save + fsync", "torch_save", f"ours is {m['torch_save']['seconds'] / ours:.2f}× faster")
    row("safetensors.save_file + fsync", "safetensors", f"ours is {m['safetensors']['seconds'] / ours:.2f}× faster")
    row("torch.distributed.checkpoint.save", "dcp", f"ours is {m['dcp']['seconds'] / ours:.2f}× faster")
    row("**unbroken sync save**", "ours_sync", f"{(gb / ours) / W:.2f} × W")
    stall = m["ours_async"]["stall_s"]
    row("**unbroken async: stall in step()** (steady state)", "ours_async",
        f"{stall / (gb / M):.2f} × (bytes÷M); {stall / m['torch_save']['seconds'] * 100:.1f}% of torch.save",
        field="stall_s")
    row("unbroken async: stall of the first save (allocates the buffer)", "ours_async",
        f"{m['ours_async']['first_stall_s'] / (gb / M):.2f} × (bytes÷M)", field="first_stall_s")
    row("unbroken async: until committed", "ours_async", f"{(gb / m['ours_async']['seconds']) / W:.2f} × W")
    row("**restore, cold cache**", "restore_cold", f"{m['restore_cold']['seconds'] / (gb / R):.2f} × (bytes÷R)")
    row("restore, warm cache", "restore_warm", "")
    alone, during = m["train_overlap"]["step_alone_s"], m["train_overlap"]["step_during_save_s"]
    rows.append(f"| training step alone / during a background save | {alone * 1000:.1f} / {during * 1000:.1f} ms "
                f"| | {during / alone:.2f}× | |")
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", nargs="+", default=["large", "small"], choices=["large", "small"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=str(HERE / "out"))
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(measure(args.child, args.workload[0], out)))
        return
    text = (f"\n## Checkpoint I/O ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, medians of {args.repeats})\n\n"
            f"Command: `.venv/bin/python bench/io_bench.py {' '.join(sys.argv[1:])}`\n\n")
    for workload in args.workload:
        text += table(workload, bench(workload, out, args.repeats)) + "\n"
    print(text)
    if args.record:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(text)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
