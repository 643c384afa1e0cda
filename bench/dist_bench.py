"""Distributed save/restore benchmark: the same state saved and restored by 1, 2 and 4 ranks (gloo, CPU).

    .venv/bin/python bench/dist_bench.py [--worlds 1 2 4] [--mb 256] [--repeats 3] [--sharded] [--record]

State: ``--mb`` MiB of float32 parameters in 16 MiB tensors plus SGD momentum of the same size,
identical on every rank (replicated, as under DDP), or with ``--sharded`` the same model under FSDP2
(``fully_shard``: every rank holds 1/N).  Every rank is its own process (torchrun's environment,
one thread each).  For each world size it reports:

* save: wall time of a synchronous ``CheckpointManager.save`` (from a barrier until every rank
  returned, i.e. committed), median of ``--repeats``; the bytes each rank wrote (its file);
* restore: wall time of ``restore()`` with the page cache of the checkpoint evicted first, in the
  default ``direct`` mode and in ``broadcast`` mode; the bytes each rank read from storage.

All ranks share this machine's cores and disk, so more ranks do not add bandwidth here: the figures
show the protocol's overhead and the division of the bytes, not a cluster's scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import evict

HERE = Path(__file__).resolve().parent
TENSOR_MIB = 16


# -- one rank -----------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch import nn

    import unbroken

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    count = max(1, args.mb // TENSOR_MIB)
    model = nn.ParameterList([nn.Parameter(torch.randn(TENSOR_MIB << 18)) for _ in range(count)])
    if args.sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # momentum buffers exist: the optimizer state is as large as the model
    state = {"model": model, "optimizer": opt}
    run = Path(args.run)
    ckpt = unbroken.CheckpointManager(run, state, async_save=False, save_on_close=False, stop_signals=None)
    saves = []
    for step in range(1, args.repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        ckpt.save(step)
        saves.append(time.perf_counter() - started)
    ckpt.close()
    dist.barrier()
    files = sorted((run / f"step_{args.repeats:09d}").glob("rank*.safetensors"))
    written = files[rank].stat().st_size if world > 1 else files[0].stat().st_size
    restores = {}
    for mode in ("direct", "broadcast") if world > 1 else ("direct",):
        if rank == 0:
            evict(run / f"step_{args.repeats:09d}")
        dist.barrier()
        manager = unbroken.CheckpointManager(run, state, restore_mode=mode, save_on_close=False, stop_signals=None)
        started = time.perf_counter()
        manager.restore()
        elapsed = time.perf_counter() - started
        source = manager._dist.last_source if manager._dist is not None else None
        read = source.bytes_read if source is not None else sum(f.stat().st_size for f in files)
        manager.close()
        restores[mode] = (elapsed, read)
        dist.barrier()
    print(json.dumps({"rank": rank, "saves": saves, "written": written, "restores": restores}), flush=True)
    dist.destroy_process_group()


# -- the launcher ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    run = Path(args.dir) / f"run_w{world}"
    shutil.rmtree(run, ignore_errors=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", "--run", str(run), "--mb", str(args.mb),
               "--repeats", str(args.repeats)] + (["--sharded"] if args.sharded else [])
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"a rank of world {world} failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    shutil.rmtree(run, ignore_errors=True)
    return sorted(results, key=lambda r: r["rank"])


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f}"


def table(worlds: list[int], args: argparse.Namespace) -> str:
    kind = "sharded (FSDP2)" if args.sharded else "replicated (DDP-style)"
    lines = [f"State: {args.mb} MiB of parameters + {args.mb} MiB of SGD momentum, {kind}.", "",
             "| ranks | save (median) | MiB written per rank | restore direct | MiB read per rank (direct) "
             "| restore broadcast | MiB read per rank (broadcast) |", "|---|---|---|---|---|---|---|"]
    for world in worlds:
        ranks = measure(world, args)
        save = statistics.median(max(r["saves"][i] for r in ranks) for i in range(args.repeats))
        direct = max(r["restores"]["direct"][0] for r in ranks)
        cells = [str(world), f"{save:.2f} s", " / ".join(mib(r["written"]) for r in ranks), f"{direct:.2f} s",
                 " / ".join(mib(r["restores"]["direct"][1]) for r in ranks)]
        if world > 1:
            cells += [f"{max(r['restores']['broadcast'][0] for r in ranks):.2f} s",
                      " / ".join(mib(r["restores"]["broadcast"][1]) for r in ranks)]
        else:
            cells += ["(one rank)", ""]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "unbroken-dist-bench"))
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    result = table(args.worlds, args)
    command = " ".join(["bench/dist_bench.py"] + sys.argv[1:])
    header = (f"## Distributed save/restore ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} "
              f"cores, torch {torch.__version__}, gloo, one thread per rank)\n\n"
              f"Command: `.venv/bin/python {command}`\n")
    print("\n" + header + "\n" + result)
    if args.record:
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as out:
            out.write("\n" + header + "\n" + result + "\n")


if __name__ == "__main__":
    main()
