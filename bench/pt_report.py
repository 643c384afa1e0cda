"""Markdown tables of bench/per_tensor.py: per workload, and the per-tensor sweep."""

from __future__ import annotations

import statistics
from typing import Any

import workloads
from benchlib import ratios, spread
from pt_methods import LOADS, SAVES

PEERS_SAVE = ("torch.save", "safetensors", "dcp")
PEERS_LOAD = ("torch.load", "safetensors", "dcp")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def ratio_text(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}× ({r[1]:.2f}-{r[2]:.2f})"


def workload_table(spec: str, m: dict[str, list[dict[str, Any]]]) -> list[str]:
    first = m["save:floor"][0]
    lines = [f"### {workloads.describe(spec)}: {first['tensors']:,} tensors, {workloads.gigabytes(first['bytes'])}", "",
             "| operation | method | median | min-max | × reference, median (min-max over rounds) "
             "| extra peak RSS | RSS kept |", "|---|---|---|---|---|---|---|"]

    def row(op: str, method: str, key: str, field: str, ref: tuple[str, str] | None, note: str = "",
            rss: tuple[str, str] = ("peak", "kept")) -> None:
        values = [r[field] for r in m[key]]
        med, lo, hi = spread(values)
        rel = "reference" if ref is None else ratio_text(ratios(values, [r[ref[1]] for r in m[ref[0]]]))
        if rss[0] in m[key][0]:
            memory = " | ".join(mib(statistics.median(r[f] for r in m[key])) for f in rss)
        else:  # a warm restore follows the cold one in its process, which may reuse the memory that one freed
            memory = "see cold | see cold"
        lines.append(f"| {op} | {method} | {fmt(med)} | {fmt(lo)}-{fmt(hi)} | {rel}{note} | {memory} |")

    floor = ("save:floor", "s")
    for method in SAVES:
        row("durable save", f"**{method}**" if method == "unbroken" else method, f"save:{method}", "s",
            None if method == "floor" else floor)
    memcpy = ("stall:memcpy", "stall")
    row("async stall", "memcpy into a touched buffer", "stall:memcpy", "stall", None)
    row("async stall", "memcpy into a fresh buffer", "stall:memcpy", "first", memcpy)
    for method, name in (("unbroken", "**unbroken** step()"), ("dcp", "DCP async_save, stager reused")):
        key = f"stall:{method}"
        row("async stall", f"{name}, steady", key, "stall", memcpy)
        steady = ratio_text(ratios([r["first"] for r in m[key]], [r["stall"] for r in m[key]]))
        row("async stall", f"{name}, first save", key, "first", memcpy, f"; {steady} its steady stall")
        row("async save", f"{name}, until committed", key, "commit", floor, " of floor save")
    for temp in ("cold", "warm"):
        ref = ("restore:floor", temp)
        for method in LOADS:
            row(f"restore, {temp}", f"**{method}**" if method == "unbroken" else method, f"restore:{method}", temp,
                None if method == "floor" else ref, rss=("cold_peak", "cold_kept") if temp == "cold" else ("-", "-"))
    lines += ["", "unbroken ÷ the fastest peer in each round, median (min-max): "
              + "; ".join(f"{what} {ratio_text(versus(m, key, field, peers))}" for what, key, field, peers in (
                  ("durable save", "save", "s", PEERS_SAVE), ("steady stall vs DCP", "stall", "stall", ("dcp",)),
                  ("restore cold", "restore", "cold", PEERS_LOAD), ("restore warm", "restore", "warm", PEERS_LOAD))),
              "", f"Floor references: save = one os.write per tensor + fsync; stall = per-tensor copy_ into one "
              f"preallocated, touched buffer; restore = one readinto per tensor into preallocated tensors. "
              f"Extra RSS method: {m['save:floor'][0]['rss']}.", ""]
    return lines


def versus(m: dict[str, list[dict[str, Any]]], phase: str, field: str, peers: tuple[str, ...]) -> tuple[float, ...]:
    ours = [r[field] for r in m[f"{phase}:unbroken"]]
    best = [min(vals) for vals in zip(*([r[field] for r in m[f"{phase}:{p}"]] for p in peers), strict=True)]
    return ratios(ours, best)


def sweep_table(sweep: dict[str, dict[str, list[float]]], with_dcp: bool) -> list[str]:
    keys = [f"save:{m}" for m in SAVES] + [f"restore:{m}" for m in LOADS]
    keys = [k for k in keys if with_dcp or not k.endswith(":dcp")]
    sizes = list(sweep)
    head = " | ".join(k.replace("save:", "save ").replace("restore:", "restore ") for k in keys)
    lines = ["### Per-tensor cost sweep (µs per tensor, median; restores warm, into fresh objects)", "",
             f"| tensors | {head} |", "|---|" + "---|" * len(keys)]
    n = {spec: workloads.sweep_tensors(spec) or 1 for spec in sizes}
    for spec in sizes:
        cells = [f"{statistics.median(sweep[spec][k]) / n[spec] * 1e6:.1f}" for k in keys]
        lines.append(f"| {n[spec]:,} | " + " | ".join(cells) + " |")
    if len(sizes) >= 3:
        lines += ["", "Marginal cost between consecutive points (µs per added tensor) and whether it stays "
                  "flat (linear: the last step costs ≤ 1.5× the second step per tensor; the first step "
                  "carries fixed costs):",
                  "", "| method | " + " | ".join(f"{sizes[i]}→{sizes[i + 1]}" for i in range(len(sizes) - 1))
                  + " | linear? |", "|---|" + "---|" * len(sizes)]
        for k in keys:
            t = [statistics.median(sweep[s][k]) for s in sizes]
            marg = [(t[i + 1] - t[i]) / (n[sizes[i + 1]] - n[sizes[i]]) * 1e6 for i in range(len(sizes) - 1)]
            if marg[1] <= 0:
                verdict = "unclear (noise: the middle step measured ≤ 0)"
            else:
                verdict = "yes" if marg[-1] <= 1.5 * marg[1] else f"no ({marg[-1] / marg[1]:.1f}×)"
            lines.append(f"| {k} | " + " | ".join(f"{v:.1f}" for v in marg) + f" | {verdict} |")
    return lines + [""]


def report(measured: dict[str, dict[str, list[dict[str, Any]]]], sweep: dict[str, dict[str, list[float]]],
           repeats: int, with_dcp: bool, header: list[str]) -> str:
    lines = [*header, ""]
    for spec, m in measured.items():
        lines += workload_table(spec, m)
    if sweep:
        lines += sweep_table(sweep, with_dcp)
    lines.append(f"Every figure is from this run ({repeats} rounds); compare ratios, not absolute times, "
                 "across runs on this shared machine.")
    return "\n".join(lines)
