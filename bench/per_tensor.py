"""Per-tensor checkpoint cost (issue 15): unbroken against the floor and its peers, interleaved in one run.

    .venv/bin/python bench/per_tensor.py [--quick] [--repeats 5] [--large] [--gpt] [--sizes 1k 4k 16k 64k]
                                         [--sweep-dcp] [--src OTHER/src] [--label TEXT] [--record]

Workloads (bench/workloads.py): S = 1,700 Linear(64, 64) + Adam (13,600 tensors, 85 MB) always;
L = 1 GiB in 64 tensors with --large; T = GPT-2-small-like + AdamW (1.49 GB) with --gpt; and a sweep
of 1k/4k/16k/64k tiny tensors (each point: n/4 parameters of 16 float32 + their Adam state, so the
restore rebuilds optimizer state through each method's own path).

For S, L and T every measurement runs in a fresh process (imports and a tiny warm-up run of the same
method come first, outside the timed region), and each round runs every method once, in an order
rotated by one per round; ratios are taken within a round, then the median and min-max over rounds:
  save     floor (one os.write per tensor from tensor memory + fsync), unbroken.save, torch.save + fsync,
           safetensors save_file + fsync, torch.distributed.checkpoint.save (one process, no process group)
  stall    memcpy (every tensor copied into one preallocated, touched buffer), unbroken async
           CheckpointManager.step() (first save: built 1 s of training compute earlier; steady: the next
           save), DCP async_save with one DefaultStager reused (first and second save)
  restore  into fresh objects (a new model, an optimizer without state), cold (page cache dropped or the
           files evicted) then warm: floor (one readinto per tensor into preallocated tensors),
           unbroken.load, torch.load + load_state_dict, safetensors load_file + load_state_dict, DCP
           (get_state_dict, dcp.load, set_state_dict: its documented path)
Extra RSS: the process's VmHWM is reset (/proc/self/clear_refs) right before each operation; "peak" is
the high-water mark above the RSS at that moment, "kept" what stays resident when it returns (a restore
into fresh objects keeps the optimizer state it creates).  The sweep runs all its methods in one
process per point and round (time only; its files are small, so its restores are warm).
--src runs the children against another source tree (PYTHONPATH), e.g. an export of an older commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import workloads
from benchlib import HERE, PeakRss, drop_page_cache, evict, flat, git_commit, machine, nbytes, record_section
from pt_methods import LOADS, SAVES, STALLS, warm_up
from pt_report import report

ROUND: dict[str, list[str]] = {"save": list(SAVES), "stall": list(STALLS), "restore": list(LOADS)}


# -- children ----------------------------------------------------------------------------------------------
def child(phase: str, method: str, spec: str, out: Path) -> dict[str, Any]:
    warm_up(phase, method, out / "warmup")
    probe = PeakRss()
    if phase == "save":
        state = workloads.build(spec)
        probe.start()
        start = time.perf_counter()
        SAVES[method](state, out)
        seconds = time.perf_counter() - start
        return {"s": seconds, "peak": probe.peak(), "kept": probe.kept(), "rss": probe.method,
                "bytes": nbytes(state), "tensors": len(flat(state))}
    if phase == "stall":
        state = workloads.build(spec)
        probe.start()
        got = STALLS[method](state, out)
        return {**got, "peak": probe.peak(), "kept": probe.kept()}
    result: dict[str, Any] = {}
    for temp in ("cold", "warm"):
        target = workloads.build(spec, seed=1, stepped=False)
        prepare, run = LOADS[method]
        ready = prepare(target, lambda: workloads.build(spec))
        if temp == "cold":
            evict(out)
        probe.start()
        start = time.perf_counter()
        run(ready, out)
        result.update({temp: time.perf_counter() - start, f"{temp}_peak": probe.peak(),
                       f"{temp}_kept": probe.kept()})
        del target, ready
    return result


def sweep_child(spec: str, order: list[str], out: Path, with_dcp: bool) -> dict[str, float]:
    """Every sweep method once, in ``order`` (saves before the restores that read them); seconds each."""
    state = workloads.build(spec)
    times: dict[str, float] = {}
    for key in order:
        phase, method = key.split(":")
        if method == "dcp" and not with_dcp:
            continue
        warm_up(phase, method, out / "warmup")
        if phase == "save":
            start = time.perf_counter()
            SAVES[method](state, out)
        else:
            prepare, run = LOADS[method]
            ready = prepare(workloads.build(spec, seed=1, stepped=False), lambda: state)
            start = time.perf_counter()
            run(ready, out)
        times[key] = time.perf_counter() - start
    return times


# -- orchestration -------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, out: Path, src: str | None) -> None:
        self.out, self.env = out, dict(os.environ)
        if src:
            self.env["PYTHONPATH"] = os.path.abspath(src)
        self.dropped = False

    def call(self, *argv: str) -> Any:
        self.dropped = drop_page_cache() or self.dropped
        proc = subprocess.run([sys.executable, __file__, "--dir", str(self.out), *argv], env=self.env,
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"per_tensor.py {' '.join(argv)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def rotate(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def run_workload(runner: Runner, spec: str, repeats: int, log: Callable[[str], None]) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {}
    for r in range(repeats):
        clean(runner.out)
        for phase, methods in ROUND.items():
            for method in rotate(methods, r):
                got = runner.call("--child", f"{phase}:{method}", "--workload", spec)
                results.setdefault(f"{phase}:{method}", []).append(got)
                log(f"  {spec} round {r + 1}/{repeats} {phase:7s} {method:12s} "
                    + " ".join(f"{k}={v:.3f}" for k, v in got.items() if k in ("s", "stall", "first", "cold", "warm")))
    return results


def run_sweep(runner: Runner, sizes: list[str], repeats: int, with_dcp: bool,
              log: Callable[[str], None]) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(repeats):
        for spec in sizes:
            clean(runner.out)
            order = [f"save:{m}" for m in rotate(list(SAVES), r)] + [f"restore:{m}" for m in rotate(list(LOADS), r)]
            got = runner.call("--child", "sweep", "--order", ",".join(order), "--workload", spec,
                              *(["--sweep-dcp"] * with_dcp))
            for key, seconds in got.items():
                results.setdefault(spec, {}).setdefault(key, []).append(seconds)
            log(f"  sweep {spec} round {r + 1}/{repeats} " + " ".join(f"{k}={v:.3f}" for k, v in got.items()))
    return results


def clean(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds (default 5): a few minutes for S and the sweep")
    p.add_argument("--repeats", type=int, help="rounds (default 5, or 3 with --quick)")
    p.add_argument("--large", action="store_true", help="also workload L (1 GiB in 64 tensors; slow here)")
    p.add_argument("--gpt", action="store_true", help="also workload T (GPT-2-small-like + AdamW, 1.49 GB; slow)")
    p.add_argument("--no-s", action="store_true", help="skip workload S")
    p.add_argument("--sizes", nargs="*", default=["1k", "4k", "16k", "64k"], help="sweep points (none: no sweep)")
    p.add_argument("--sweep-dcp", action="store_true", help="include DCP in the sweep (about 0.5 ms per tensor)")
    p.add_argument("--src", help="run the children against this source tree (PYTHONPATH), e.g. an older commit")
    p.add_argument("--label", help="what the section is keyed by (default: the commit of the measured src)")
    p.add_argument("--dir", help="scratch directory (default: a temporary one under bench/)")
    p.add_argument("--json", help="also write every measurement of every round to this file")
    p.add_argument("--record", action="store_true", help="replace or append this label's section in bench/RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)  # PHASE:METHOD, or "sweep" with --order
    p.add_argument("--order", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = Path(args.dir)
        if args.child == "sweep":
            print(json.dumps(sweep_child(args.workload, args.order.split(","), out, args.sweep_dcp)))
        else:
            phase, method = args.child.split(":")
            print(json.dumps(child(phase, method, args.workload, out)))
        return
    repeats = args.repeats or (3 if args.quick else 5)
    specs = [s for s, on in (("S", not args.no_s), ("L", args.large), ("T", args.gpt)) if on]
    for spec in args.sizes:
        if workloads.sweep_tensors(spec) is None:
            p.error(f"--sizes {spec}: a sweep point is a count of thousands of tensors, e.g. 4k")
    label = args.label or git_commit(Path(args.src) if args.src else None)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=args.dir or HERE, prefix="per_tensor.") as tmp:
        runner = Runner(Path(tmp) / "work", args.src)
        measured = {spec: run_workload(runner, spec, repeats, print) for spec in specs}
        sweep = run_sweep(runner, args.sizes, repeats, args.sweep_dcp, print) if args.sizes else {}
    if args.json:
        Path(args.json).write_text(json.dumps({"label": label, "workloads": measured, "sweep": sweep}, indent=1))
    cache = ("page cache dropped (/proc/sys/vm/drop_caches) before every measurement" if runner.dropped else
             "drop_caches is not permitted here (container), so a cold restore follows posix_fadvise(DONTNEED) "
             "of the checkpoint's own files after an fsync; a host-side cache below the VM may still serve them")
    command = shlex.join([".venv/bin/python", "bench/per_tensor.py", *sys.argv[1:]])
    heading = f"Per-tensor cost at {label}"
    body = report(measured, sweep, repeats, args.sweep_dcp, header=[
        f"Command: `{command}`", "",
        f"{machine()}; {repeats} interleaved rounds; {time.time() - started:.0f} s in all; {cache}."])
    print(f"\n## {heading}\n\n{body}")
    if args.record:
        record_section(heading, body)
        print(f"recorded in {HERE / 'RESULTS.md'} under '## {heading}'")


if __name__ == "__main__":
    main()
