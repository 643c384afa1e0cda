"""Object-storage throughput: a checkpoint through FsspecStorage against plain s3fs, same bytes, same run.

    .venv/bin/python bench/s3_bench.py [--mb 256] [--repeats 3] [--block-mb 64]

A moto S3 server runs as a separate process on 127.0.0.1 (so its CPU is not this process's), and
each measurement is repeated ``--repeats`` times in alternating order; the table shows medians.
  upload:   unbroken.checkpoint.single.save_checkpoint (capture, CRC32C, multipart upload, manifest commit)
            against s3fs ``pipe_file`` of the same file bytes (raw transfer, no checksums)
  download: unbroken.checkpoint.single.load_checkpoint (manifest, ranged GETs, every CRC checked, copy into
            the live tensors) against s3fs ``cat_file`` of the same object
The state is 8 float32 tensors of N/8 MB.  Numbers measure the client stack against a local
Python server, not a real network: moto's request handling is usually the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchlib import Tensors  # noqa: E402 (bench/ is on sys.path when this file runs as a script)

from unbroken.checkpoint.single import load_checkpoint, save_checkpoint  # noqa: E402
from unbroken.storage import FsspecStorage, step_name  # noqa: E402

MiB = 1024 * 1024
KEY, SECRET, REGION = "bench-key", "bench-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start within 30 s (pip install 'moto[server]')")


class RequestCounter:
    """Counts the S3 API calls an s3fs filesystem makes, by operation: the filesystem's own calls go
    through ``_call_s3``, those of its file objects (multipart uploads) through the sync ``call_s3``."""

    def __init__(self, fs: Any) -> None:
        self.counts: Counter[str] = Counter()
        real_async, real_sync = fs._call_s3, fs.call_s3

        async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
            self.counts[method] += 1
            return await real_async(method, *args, **kwargs)

        def counted_sync(method: str, *args: Any, **kwargs: Any) -> Any:
            self.counts[method] += 1
            return real_sync(method, *args, **kwargs)  # bound to the original _call_s3: counted once

        fs._call_s3, fs.call_s3 = counted, counted_sync

    def take(self) -> str:
        out = ", ".join(f"{n} {m}" for m, n in sorted(self.counts.items()))
        self.counts.clear()
        return out


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="checkpoint size in MB (default 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-mb", type=int, default=64, help="FsspecStorage multipart part size")
    args = parser.parse_args()

    port = free_port()
    server = start_server(port)
    try:
        run(args, f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(args: argparse.Namespace, endpoint: str) -> None:
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=bucket)
    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}}
    storage = FsspecStorage(f"s3://{bucket}/run", options, block_size=args.block_mb * MiB)
    fs = storage.fs
    numel = args.mb * MiB // 4 // 8
    gen = torch.Generator().manual_seed(0)
    state = {"model": Tensors({f"t{i}": torch.randn(numel, generator=gen) for i in range(8)})}
    target = {"model": Tensors({f"t{i}": torch.zeros(numel) for i in range(8)})}
    nbytes = 8 * numel * 4

    times: dict[str, list[float]] = {k: [] for k in ("ours_up", "raw_up", "ours_down", "raw_down")}
    requests: dict[str, str] = {}
    counter = RequestCounter(fs)
    payload = b""
    for rep in range(args.repeats):
        name, raw = step_name(rep + 1), f"{bucket}/raw/{rep}.bin"
        for who in (["ours", "raw"] if rep % 2 == 0 else ["raw", "ours"]):  # alternate who goes first
            if who == "ours":
                counter.take()
                times["ours_up"].append(timed(save_checkpoint, storage, name, state, rep + 1, rng=False))
                requests["ours_up"] = counter.take()
                times["ours_down"].append(timed(load_checkpoint, storage, name, target, rng=False))
                requests["ours_down"] = counter.take()
                # the baseline moves the same bytes: our data object itself
                payload = payload or fs.cat_file(storage.path(name, "rank00000.safetensors"))
            else:
                payload = payload or os.urandom(nbytes)
                counter.take()
                times["raw_up"].append(timed(fs.pipe_file, raw, payload))
                requests["raw_up"] = counter.take()
                times["raw_down"].append(timed(fs.cat_file, raw))
                requests["raw_down"] = counter.take()
                small = [timed(fs.cat_file, raw, start=0, end=MiB) for _ in range(3)]
                times.setdefault("ranged_get", []).append(statistics.median(small))
        storage.delete(name)
        fs.rm_file(raw)
    for name, tensor in target["model"].tensors.items():
        if not torch.equal(tensor, state["model"].tensors[name]):
            raise SystemExit(f"round trip mismatch in {name}")
    report(args, nbytes, times, requests)


def report(args: argparse.Namespace, nbytes: int, times: dict[str, list[float]], requests: dict[str, str]) -> None:
    def rate(key: str) -> float:
        return nbytes / MiB / statistics.median(times[key])

    print(f"Object storage: {nbytes / MiB:.0f} MiB checkpoint, moto server on 127.0.0.1, "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, medians of {args.repeats}, "
          f"FsspecStorage block {args.block_mb} MiB\n")
    print("| operation | FsspecStorage | plain s3fs (pipe_file / cat_file) | FsspecStorage / s3fs |")
    print("|---|---|---|---|")
    rows = (("upload (save)", "ours_up", "raw_up"), ("download (load, CRC-verified)", "ours_down", "raw_down"))
    for op, ours, raw in rows:
        print(f"| {op} | {rate(ours):.0f} MB/s ({statistics.median(times[ours]):.2f} s) | "
              f"{rate(raw):.0f} MB/s ({statistics.median(times[raw]):.2f} s) | {rate(ours) / rate(raw):.2f} |")
    print("\nS3 requests of one run:")
    for op, ours, raw in rows:
        print(f"- {op}: FsspecStorage {requests[ours]}; s3fs {requests[raw]}")
    ranged_ms = statistics.median(times["ranged_get"]) * 1e3
    print(f"\nOne 1 MiB ranged GET of the {nbytes / MiB:.0f} MiB object takes {ranged_ms:.0f} ms on this server "
          "(moto reads and copies the whole object for every GET, then slices the range).")


if __name__ == "__main__":
    main()
