"""Rank 0's cost of committing a checkpoint saved by N ranks (issue 19), from synthetic per-rank reports.

    .venv/bin/python bench/scale_commit.py [--quick] [--ranks 10 100 1000 10000] [--workloads ddp fsdp]
                                           [--fsdp-max 1000] [--repeats 3] [--profile ddp:10000] [--record]

No process group: every rank's report is built here with the code every rank runs
(``unbroken.distributed.assemble.report_of`` on a :class:`RankPlan`) and encoded as the gather encodes
it (``collectives._dumps``).  Rank 0's side is then run for real, in a fresh process per measurement:
  gather    what ``Comm.gather_bytes``/``gather_json`` do on rank 0 once gloo delivered the bytes: one
            uint8 buffer per rank padded to the longest report, copied out to ``bytes``, JSON-decoded
  assemble  ``assemble(base, plan, reports)``: every check, the files/tensors/sharded tables
  serialize ``Manifest.to_json()`` (the bytes rank 0 commits)
  validate  ``Manifest.from_json()``: what every reader runs on the committed manifest (seal, caps,
            every entry, the shards' cover check)
  outcome   the broadcast that tells every rank the result (``{"ok": true, "files": ...}``), encoded
Memory: the VmHWM high-water mark above the RSS before the gather (the delivered report bytes, which
gloo would have written into the gather buffers, are loaded before that point), and, in a separate
child (tracemalloc slows Python down), tracemalloc's peak over the same steps.
Times are CPU seconds of rank 0's process (the wall time on a shared machine is whatever other jobs
leave); the JSON of each child also has the wall time.  Rounds are interleaved (each round runs every
(workload, ranks) once, order rotated by one per round);
the tables show medians with min-max.

Workloads, both a TinyLlama-1.1B-like model + AdamW (201 parameters, 603 tensors, 13.2 GB in fp32):
  ddp   replicated: every rank holds everything; the 603 tensors are spread over the ranks' files by
        ``assign_writers`` (the real function); every rank saves its RNG streams (real capture()).
  fsdp  FSDP2-like: every tensor is a DTensor sharded on dim 0 into N pieces as torch's Shard(0) cuts it
        (ceil(rows / N) rows per rank; ranks past the last row hold an empty piece and store nothing),
        so the manifest grows as tensors x min(ranks, rows).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
import random
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from benchlib import PeakRss, git_commit, machine, record_section  # noqa: E402

from unbroken.checkpoint.single import versions  # noqa: E402
from unbroken.distributed.assemble import assemble, report_of  # noqa: E402
from unbroken.distributed.collectives import decode_all  # noqa: E402
from unbroken.distributed.rankplan import BLOCK_BYTES, RankPlan  # noqa: E402
from unbroken.distributed.roles import (  # noqa: E402
    assign_writers,
    file_name,
    rank_prefix,
    rename_refs,
    shard_name,
    split_entries,
)
from unbroken.format import FileEntry, Manifest, TensorEntry  # noqa: E402
from unbroken.format.dtypes import ITEMSIZES  # noqa: E402
from unbroken.state import capture  # noqa: E402

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
ITEM = 4  # fp32 parameters and Adam state
HEADER = 64 * 1024  # a rank file's safetensors header, roughly (only offsets depend on it)


# -- the model --------------------------------------------------------------------------------------------
def model_shapes(layers: int = 22, hidden: int = 2048, ffn: int = 5632,
                 vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """TinyLlama-1.1B's parameter shapes (201 tensors)."""
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (256, hidden),
                       p + "self_attn.v_proj.weight": (256, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def shared_state(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The shared entries (model + AdamW) as capture() encodes them, and every stored tensor's shape."""
    tensors: dict[str, tuple[int, ...]] = {}
    module: dict[str, Any] = {}
    for name, shape in shapes.items():
        module[name] = {"__tensor__": f"model/{name}"}
        tensors[f"model/{name}"] = shape
    state: dict[str, Any] = {}
    for index, shape in enumerate(shapes.values()):
        entry = {"step": 1000}
        for moment in ("exp_avg", "exp_avg_sq"):
            ref = f"optimizer/state/{index}/{moment}"
            entry[moment] = {"__tensor__": ref}
            tensors[ref] = shape
        state[str(index)] = entry
    groups = [{"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
               "params": list(range(len(shapes)))}]
    return {"model": {"kind": "module", "value": module, "meta": {}},
            "optimizer": {"kind": "optimizer", "value": {"state": state, "param_groups": groups}}}, tensors


def per_rank_state() -> dict[str, Any]:
    """A rank's own entries as a real capture() makes them: its RNG streams, an epoch, a scheduler."""
    snap = capture({"epoch": 3, "scheduler": {"last_epoch": 1000, "_step_count": 1001}}, rng=True)
    return split_entries(snap.state)[1]


# -- one rank's report --------------------------------------------------------------------------------------
def _entry(file: str, dtype: str, shape: tuple[int, ...], begin: int, rng: random.Random) -> TensorEntry:
    nbytes = math.prod(shape) * ITEMSIZES[dtype]
    blocks = (tuple(rng.getrandbits(32) for _ in range(-(-nbytes // BLOCK_BYTES))) if nbytes > BLOCK_BYTES else ())
    return TensorEntry(file, dtype, shape, begin, begin + nbytes, rng.getrandbits(32),
                       BLOCK_BYTES if blocks else 0, blocks)


def _entries(file: str, stored: list[tuple[str, str, tuple[int, ...]]], rng: random.Random
             ) -> tuple[FileEntry, dict[str, TensorEntry]]:
    entries, offset = {}, HEADER
    for name, dtype, shape in stored:
        entries[name] = _entry(file, dtype, shape, offset, rng)
        offset = entries[name].end
    return FileEntry(offset, rng.getrandbits(32)), entries


class _Plan(RankPlan):
    """A RankPlan whose digest was computed once (it is every rank's own cost, equal on every rank)."""

    cached = 0

    def digest(self) -> int:
        return self.cached


def _rank_state(mine: dict[str, Any], rank: int) -> dict[str, Any]:
    prefix = rank_prefix(rank)
    return {k: rename_refs(v, lambda n: prefix + n) for k, v in mine.items()}


class Workload:
    def __init__(self, kind: str, ranks: int) -> None:
        self.kind, self.ranks = kind, ranks
        self.shared, self.tensors = shared_state(model_shapes())
        self.mine = per_rank_state()
        self.rng_tensors = {"unbroken.rng/torch": ("U8", (5056,)), "unbroken.rng/numpy/1": ("U32", (624,))}
        role = "sharded" if kind == "fsdp" else "replicated"
        self.layout = [[n, "F32", list(s), role] for n, s in self.tensors.items()]
        probe = RankPlan(0, file_name(0), shared=self.shared, layout=self.layout)
        self.digest = probe.digest()
        if kind == "ddp":
            sizes = [(n, math.prod(s) * ITEM) for n, s in self.tensors.items()]
            owner = assign_writers(sizes, ranks)
            self.owned: dict[int, list[str]] = {}
            for name in self.tensors:
                self.owned.setdefault(owner[name], []).append(name)

    def plan(self, rank: int) -> _Plan:
        plan = _Plan(rank, file_name(rank), shared=self.shared, rank_state=_rank_state(self.mine, rank),
                     layout=[list(row) for row in self.layout])
        plan.cached = self.digest
        return plan

    def report(self, rank: int) -> dict[str, Any]:
        plan = self.plan(rank)
        rng = random.Random(rank)
        prefix = rank_prefix(rank)
        stored = [(prefix + n, d, s) for n, (d, s) in self.rng_tensors.items()]
        if self.kind == "ddp":
            stored += [(n, "F32", self.tensors[n]) for n in self.owned.get(rank, [])]
        else:
            for name, shape in self.tensors.items():
                info: dict[str, Any] = {"dtype": "F32", "shape": list(shape), "placements": ["Shard(dim=0)"],
                                        "mesh": [self.ranks]}
                chunk = -(-shape[0] // self.ranks)
                start = min(rank * chunk, shape[0])
                rows = min(chunk, shape[0] - start)
                if rows > 0:
                    piece = (rows, *shape[1:])
                    stored.append((shard_name(name, rank), "F32", piece))
                    info["shard"] = {"tensor": shard_name(name, rank), "offsets": [start, *[0] * (len(shape) - 1)],
                                     "shape": list(piece)}
                plan.sharded[name] = info
        file_entry, entries = _entries(plan.file_name, stored, rng)
        return report_of(plan, file_entry, entries)

    def base(self) -> Manifest:
        return Manifest(step=1000, created=time.time(), world_size=self.ranks, versions=versions(), files={},
                        tensors={}, state=self.shared, metrics={"loss": 2.0})


def dumps(value: Any) -> bytes:
    """As ``unbroken.distributed.collectives._dumps`` encodes a coordination message."""
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode("utf-8")


# -- rank 0 ---------------------------------------------------------------------------------------------------
def gather_on_rank0(payloads: list[bytes]) -> list[Any]:
    """What Comm.gather_json does on the destination once the bytes arrived (padded buffers included)."""
    lengths = [len(p) for p in payloads]
    longest = max(lengths)
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in payloads]
    for buffer, payload in zip(gathered, payloads, strict=True):  # gloo writes here
        buffer[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    raw = [g[:n].numpy().tobytes() for g, n in zip(gathered, lengths, strict=True)]
    del gathered
    return decode_all(raw)  # what gather_json decodes with


def commit_steps(work: Workload, payloads: list[bytes]) -> tuple[dict[str, float], dict[str, int]]:
    """Rank 0's steps; times are CPU seconds of this process (the machine is shared: wall time is
    whatever the other jobs leave, CPU time is the work), plus the wall time of the whole."""
    clock = time.process_time
    marks = [clock()]
    wall = time.perf_counter()
    reports = gather_on_rank0(payloads)
    marks.append(clock())
    manifest = assemble(work.base(), work.plan(0), reports)
    marks.append(clock())
    raw = manifest.to_json()
    marks.append(clock())
    Manifest.from_json(raw, "bench")
    marks.append(clock())
    outcome = dumps({"ok": True, "files": {n: [f.size, f.header_crc32c] for n, f in manifest.files.items()}})
    marks.append(clock())
    steps = ("gather", "assemble", "serialize", "validate", "outcome")
    times = {step: b - a for step, a, b in zip(steps, marks, marks[1:])}
    times.update(total=marks[-1] - marks[0], wall=time.perf_counter() - wall)
    sizes = {"manifest": len(raw), "outcome": len(outcome), "tensors": len(manifest.tensors),
             "shards": sum(len(s.shards) for s in manifest.sharded.values())}
    return times, sizes


def read_payloads(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from("<Q", data, at)
        out.append(data[at + 8:at + 8 + n])
        at += 8 + n
    return out


def child(args: argparse.Namespace) -> None:
    kind, ranks = args.child_kind, args.child_ranks
    path = Path(args.child_file)
    if args.child == "gen":
        work = Workload(kind, ranks)
        started = time.perf_counter()
        lengths = []
        with path.open("wb") as f:
            for rank in range(ranks):
                payload = dumps(work.report(rank))
                lengths.append(len(payload))
                f.write(struct.pack("<Q", len(payload)) + payload)
        per_rank = (time.perf_counter() - started) / ranks
        writers = timed_assign(work) if kind == "ddp" else None
        print(json.dumps({"lengths": lengths, "report_s_per_rank": per_rank, "assign_s": writers}))
        return
    work = Workload(kind, ranks)
    payloads = read_payloads(path)
    if args.child == "profile":
        profile = cProfile.Profile()
        profile.enable()
        commit_steps(work, payloads)
        profile.disable()
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        return
    probe = PeakRss()
    if args.child == "trace":
        tracemalloc.start()
        commit_steps(work, payloads)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(json.dumps({"tracemalloc_peak": peak}))
        return
    probe.start()
    times, sizes = commit_steps(work, payloads)
    print(json.dumps({"times": times, "sizes": sizes, "rss_peak": probe.peak(), "rss_method": probe.method}))


def timed_assign(work: Workload) -> float:
    """Every rank's own share of planning that depends on N: the writer assignment (a heap of N ranks)."""
    sizes = [(n, math.prod(s) * ITEM) for n, s in work.tensors.items()]
    start = time.perf_counter()
    assign_writers(sizes, work.ranks)
    return time.perf_counter() - start


# -- the parent -----------------------------------------------------------------------------------------------
def run_child(mode: str, kind: str, ranks: int, file: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--child-kind", kind,
           "--child-ranks", str(ranks), "--child-file", str(file)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {mode} {kind} {ranks} failed:\n{done.stderr[-4000:]}")
    if mode == "profile":
        print(done.stderr)
        return {}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, no tracemalloc child (the default: 3 rounds)")
    parser.add_argument("--tracemalloc", action="store_true", help="with --quick: run the tracemalloc child too")
    parser.add_argument("--ranks", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--workloads", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--fsdp-max", type=int, default=1000,
                        help="largest FSDP rank count measured (10,000 FSDP ranks need ~10 GB here)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--profile", default=None, help="KIND:RANKS: print cProfile of rank 0's steps and exit")
    parser.add_argument("--record", action="store_true", help="write the section of bench/RESULTS.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-ranks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    trace = args.tracemalloc or not args.quick
    with tempfile.TemporaryDirectory(prefix="scale-commit-") as tmp:
        if args.profile:
            kind, ranks = args.profile.split(":")
            file = Path(tmp) / "payloads.bin"
            run_child("gen", kind, int(ranks), file)
            run_child("profile", kind, int(ranks), file)
            return
        points = [(k, n) for k in args.workloads for n in args.ranks if k == "ddp" or n <= args.fsdp_max]
        files = {p: Path(tmp) / f"{p[0]}-{p[1]}.bin" for p in points}
        gen = {p: run_child("gen", p[0], p[1], files[p]) for p in points}
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {p: [] for p in points}
        for r in range(repeats):
            for p in points[r % len(points):] + points[:r % len(points)]:
                rounds[p].append(run_child("time", p[0], p[1], files[p]))
        traced = {p: run_child("trace", p[0], p[1], files[p]) if trace else {} for p in points}
    body = report(args, repeats, points, gen, rounds, traced)
    print(body)
    if args.record:
        record_section("Commit at scale: rank 0 assembling N ranks' reports (issue 19)", body)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def _spread(values: list[float], scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    if len(values) == 1 or lo == hi:
        return fmt.format(med * scale)
    return f"{fmt.format(med * scale)} ({fmt.format(lo * scale)}-{fmt.format(hi * scale)})"


def report(args: argparse.Namespace, repeats: int, points: list[tuple[str, int]], gen: dict[Any, Any],
           rounds: dict[Any, list[dict[str, Any]]], traced: dict[Any, Any]) -> str:
    command = "python bench/scale_commit.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--record")
    lines = [f"{machine()}, commit {git_commit()}, {repeats} interleaved rounds, each (workload, ranks) in a fresh "
             "process; medians (min-max).", "", f"Command: `.venv/bin/{command.strip()}`", "",
             "TinyLlama-1.1B-like model + AdamW: 603 fp32 tensors, 13.2 GB; every rank also saves its RNG streams "
             "(Python's Mersenne state is 7.6 kB of JSON) and two small values. `ddp`: replicated, the tensors "
             "spread over the ranks' files; `fsdp`: every tensor Shard(0)-split over the ranks.", "",
             "| workload | ranks | report per rank (median / max) | gathered on rank 0 (padded) | manifest | "
             "tensors / shards | outcome broadcast |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        lengths = gen[p]["lengths"]
        sizes = rounds[p][0]["sizes"]
        lines.append(f"| {p[0]} | {p[1]:,} | {_mb(statistics.median(lengths))} / {_mb(max(lengths))} | "
                     f"{_mb(p[1] * max(lengths))} | {_mb(sizes['manifest'])} | {sizes['tensors']:,} / "
                     f"{sizes['shards']:,} | {_mb(sizes['outcome'])} |")
    lines += ["", "Rank 0's CPU time (seconds) and memory:", "",
              "| workload | ranks | gather+decode | assemble | serialize | validate (from_json) | total | "
              "total per rank | RSS peak above start | tracemalloc peak |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        t = {k: [r["times"][k] for r in rounds[p]] for k in rounds[p][0]["times"]}
        rss = statistics.median(r["rss_peak"] for r in rounds[p])
        lines.append(f"| {p[0]} | {p[1]:,} | {_spread(t['gather'])} | {_spread(t['assemble'])} | "
                     f"{_spread(t['serialize'])} | {_spread(t['validate'])} | {_spread(t['total'])} | "
                     f"{_spread([x / p[1] for x in t['total']], 1e3, '{:.3g}')} ms | {_mb(rss)} | "
                     f"{_mb(traced[p]['tracemalloc_peak']) if traced[p] else 'not run'} |")
    ddp = [p for p in points if p[0] == "ddp"]
    if ddp:
        lines += ["", "Every rank's own N-dependent planning (`assign_writers`, a heap of N ranks, DDP): " + ", ".join(
            f"{p[1]:,} ranks {gen[p]['assign_s'] * 1e3:.2f} ms" for p in ddp) + "."]
    lines += ["", f"RSS peak method: {rounds[points[0]][0]['rss_method']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
