"""S3 requests per save, restore, retention delete and cleanup, counted by the server (issue 19).

    .venv/bin/python bench/s3_requests.py [--small-mb 8] [--large-mb 200] [--record]

A moto S3 server runs as a separate process on 127.0.0.1 and logs every HTTP request it serves; each
operation's requests are read from that log (method, key, query), so retries and the requests of
every client library layer are counted, and nothing in unbroken is patched.  Kinds:
  LIST (ListObjectsV2), LIST-MPU (ListMultipartUploads), HEAD, GET (object reads: the manifest and
  ranged reads of the data objects), PUT (one-request uploads and server-side copies), MPU-CREATE,
  MPU-PART, MPU-COMPLETE, MPU-ABORT, DELETE (one object), DELETE-MULTI (a batch).
Each request is also attributed to the prefix it lands on: the run (``run/``: listings of the run),
``step_N/manifest.json``, ``step_N/<data object>``.

One process (world size 1), a CheckpointManager with ``async_save=False, keep_last=2``; the state
is a model of 8 float32 tensors, ``--small-mb`` (one PUT per object, under the 64 MiB part size) and
``--large-mb`` (multipart).  The multi-rank figures in docs/DISTRIBUTED.md ("At scale") are derived
from these per-object costs and the protocol's code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchlib import Tensors, git_commit, machine, record_section  # noqa: E402

from unbroken import CheckpointManager  # noqa: E402
from unbroken.storage import FsspecStorage, step_name  # noqa: E402

KEY, SECRET, REGION = "bench-key", "bench-secret", "us-east-1"
MiB = 1 << 20
_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/[0-9.]+(?:\x1b\[[0-9;]*m)*" (\d+)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """moto_server in its own process, its request log in a file."""

    def __init__(self, log: Path) -> None:
        self.port, self.log = free_port(), log
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
        self._out = log.open("w")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self._out,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start within 30 s (pip install 'moto[server]')")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._out.close()


class Requests:
    """The requests logged since the last ``take()``."""

    def __init__(self, log: Path, bucket: str) -> None:
        self.log, self.bucket, self.at = log, bucket, 0

    def take(self) -> list[tuple[str, str, int]]:
        time.sleep(0.2)  # the server logs a request after answering it
        with self.log.open("rb") as f:
            f.seek(self.at)
            data = f.read()
        self.at += len(data)
        out = []
        for line in data.decode("utf-8", "replace").splitlines():
            match = _LINE.search(line)
            if match:
                method, target, status = match.group(1), match.group(2), int(match.group(3))
                out.append(classify(method, target, self.bucket) + (status,))
        return out


def classify(method: str, target: str, bucket: str) -> tuple[str, str]:
    """(kind, prefix) of one logged request."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    key = unquote(parts.path).lstrip("/")
    key = key[len(bucket):].lstrip("/") if key.startswith(bucket) else key
    if not key:
        if "uploads" in query:
            return "LIST-MPU", "run/"
        if "delete" in query:
            return "DELETE-MULTI", "run/"
        return ("LIST", _prefix((query.get("prefix") or [""])[0])) if method == "GET" else (method, "bucket")
    prefix = _prefix(key)
    if method == "POST":
        return ("MPU-CREATE" if "uploads" in query else "MPU-COMPLETE"), prefix
    if method == "PUT":
        return ("MPU-PART" if "partNumber" in query else "PUT"), prefix
    if method == "DELETE":
        return ("MPU-ABORT" if "uploadId" in query else "DELETE"), prefix
    return method, prefix


def _prefix(key: str) -> str:
    """run/, run/step_N/manifest.json, run/step_N/<data>, or the key's first parts."""
    parts = key.rstrip("/").split("/")
    if len(parts) <= 1:
        return "run/"
    step = re.sub(r"[0-9]+", "N", parts[1])
    if len(parts) == 2:
        return f"run/{step}/ (listing)"
    return f"run/{step}/{'manifest.json' if parts[2] == 'manifest.json' else 'data object'}"


def scenario(mb: int, endpoint: str, log: Path) -> list[tuple[str, list[tuple[str, str, int]]]]:
    import boto3

    bucket = f"req-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=bucket)
    options = {"key": KEY, "secret": SECRET, "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}}
    numel = mb * MiB // 4 // 8
    state = {"model": Tensors({f"t{i}": torch.randn(numel) for i in range(8)}), "epoch": 0}
    url = f"s3://{bucket}/run"
    requests = Requests(log, bucket)
    requests.take()
    ops: list[tuple[str, list[tuple[str, str, int]]]] = []

    def op(name: str, fn: Callable[[], Any]) -> Any:
        requests.take()
        out = fn()
        ops.append((name, requests.take()))
        return out

    manager = op("construct the manager (empty run)", lambda: CheckpointManager(
        url, state, storage_options=options, async_save=False, keep_last=2))
    op("restore() on an empty run", manager.restore)
    for step in (1, 2):
        op(f"save step {step}", lambda step=step: manager.save(step))
    op("save step 3 (keep_last=2: step 1 deleted)", lambda: manager.save(3))
    op("close()", manager.close)
    again = op("construct the manager (3 steps in the run)", lambda: CheckpointManager(
        url, state, storage_options=options, async_save=False, keep_last=2))
    op("restore() the newest (step 3)", again.restore)
    again.close()
    storage = FsspecStorage(url, options)
    op("delete one checkpoint (step 2)", lambda: storage.delete(step_name(2)))
    debris = FsspecStorage(url, options)
    staging = debris.begin(step_name(9))
    handle = staging.create("rank00000.safetensors")
    handle.write(memoryview(b"x" * 1024))
    handle.close()
    storage.clock = lambda: time.time() + 7200  # past the grace period
    op("cleanup() (one abandoned step of one object, 1 committed step)", storage.cleanup)
    return ops


def table(ops: list[tuple[str, list[tuple[str, str, int]]]]) -> str:
    lines = ["| operation | requests | by kind | by prefix |", "|---|---|---|---|"]
    for name, reqs in ops:
        kinds = Counter(k for k, _, _ in reqs)
        prefixes = Counter(p for _, p, _ in reqs)
        errors = sum(1 for _, _, s in reqs if s >= 400)
        by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        if errors:
            by_kind += f" ({errors} answered 4xx: lookups of absent keys)"
        lines.append(f"| {name} | {len(reqs)} | {by_kind} | "
                     f"{', '.join(f'{n} {p}' for p, n in sorted(prefixes.items()))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=int, default=8)
    parser.add_argument("--large-mb", type=int, default=200)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3-requests-") as tmp:
        server = Server(Path(tmp) / "moto.log")
        try:
            results = {mb: scenario(mb, server.endpoint, server.log) for mb in (args.small_mb, args.large_mb)}
        finally:
            server.stop()
    command = "python bench/s3_requests.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
    body = [f"{machine()}, commit {git_commit()}, moto_server on 127.0.0.1 (its request log).", "",
            f"Command: `.venv/bin/{command.strip()}`", ""]
    for mb, ops in results.items():
        kind = "one PUT per object" if mb * MiB < 64 * MiB else "multipart, 64 MiB parts"
        body += [f"One process, {mb} MiB of tensors in one data object ({kind}); CheckpointManager(async_save=False, "
                 "keep_last=2):", "", table(ops), ""]
    text = "\n".join(body)
    print(text)
    if args.record:
        record_section("S3 requests per operation (issue 19)", text)


if __name__ == "__main__":
    main()
