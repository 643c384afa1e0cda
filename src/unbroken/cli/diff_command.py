"""``unbroken diff A B``: what differs between two checkpoints (docs/DIFF.md).

Exit status like ``diff``: 0 identical (bitwise, or within ``--atol``), 1 different, 2 trouble (a
missing path, a corrupt checkpoint, a bad option).  Errors are handled here, not by ``main()``
(which maps library errors to 1): a failure must never read as "the checkpoints differ".

Uses only the public API; torch is imported when the comparison runs, not when the CLI starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import unbroken
from unbroken.cli.storage_commands import add_storage_option, storage_options

__all__ = ["add_diff"]

_CLIP = 60


def add_diff(sub: Any) -> None:
    """Registers the ``diff`` subcommand."""
    parser = sub.add_parser(
        "diff", help="compare two checkpoints entry by entry (exit 0 identical, 1 different, 2 error)",
        description="Compare checkpoints A and B: per state entry, the tensors that are identical, those that "
                    "differ (max abs and max rel difference), those missing on one side or with another "
                    "shape or dtype, and differing plain values, metrics and metadata. A and B are checkpoint "
                    "directories or run directories (newest valid checkpoint, or --step-a/--step-b), local or "
                    "URLs. Every tensor is verified against its checksum as it is read.",
        epilog="Exit status: 0 identical (bitwise, or within --atol), 1 different, 2 error (like diff). "
               "See docs/DIFF.md.")
    parser.add_argument("a", metavar="A", help="a checkpoint or run directory (or URL)")
    parser.add_argument("b", metavar="B", help="a checkpoint or run directory (or URL)")
    parser.add_argument("--step-a", type=int, metavar="N", help="the step of run A to compare (default: newest)")
    parser.add_argument("--step-b", type=int, metavar="N", help="the step of run B to compare (default: newest)")
    parser.add_argument("--atol", type=float, default=0.0, metavar="X",
                        help="tolerate |a - b| <= X in floating-point tensors and plain floats; integers stay "
                             "exact (default: 0, bitwise)")
    parser.add_argument("--json", action="store_true", help="print one JSON document (shape: docs/DIFF.md)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also name every identical tensor, and print values in full")
    add_storage_option(parser)
    parser.set_defaults(run=_diff)


def _diff(args: argparse.Namespace) -> int:
    try:
        result = unbroken.diff(args.a, args.b, step_a=args.step_a, step_b=args.step_b, atol=args.atol,
                               storage_options=storage_options(args))
    except Exception as exc:  # any failure to compare: 2, with the message (it names the path)
        detail = str(exc) if isinstance(exc, unbroken.UnbrokenError) else f"{type(exc).__name__}: {exc}"
        print(f"unbroken diff: error: {detail}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False))
    else:
        _print(result, args.verbose)
    return 0 if result.identical else 1


def _print(result: Any, verbose: bool) -> None:
    for label, side in (("A", result.a), ("B", result.b)):
        print(f"{label}: {side.path}  (step {side.step})")
    for value in result.checkpoint:
        print(f"checkpoint {value.name}: {_value(value.a, verbose)} -> {_value(value.b, verbose)}")
    for entry in result.entries:
        kind = entry.kind_a if entry.kind_a == entry.kind_b else f"{entry.kind_a} -> {entry.kind_b}"
        print(f"{entry.name} ({kind}): {_entry_summary(entry)}")
        _print_details(entry, verbose)
    for part in (result.metrics, result.metadata):
        if not part.identical or verbose and part.equal_values:
            print(f"{part.name}: {_entry_summary(part)}")
            _print_details(part, verbose)
    for name in result.only_a:
        print(f"{name}: only in A")
    for name in result.only_b:
        print(f"{name}: only in B")
    print(_summary(result))


def _entry_summary(entry: Any) -> str:
    tensors = len(entry.identical_tensors) + len(entry.differing_tensors)
    if entry.identical:
        held = [_count(n, noun) for n, noun in ((tensors, "tensor"), (entry.equal_values, "value")) if n]
        return f"identical ({', '.join(held)})" if held else "identical"
    parts = [f"{len(entry.identical_tensors)} of {_count(tensors, 'tensor')} identical"] if tensors else []
    parts += [_count(n, noun) for n, noun in ((len(entry.differing_tensors), "differing tensor"),
                                              (len(entry.changed), "changed"),
                                              (len(entry.values), "differing value"),
                                              (len(entry.only_a), "only in A"), (len(entry.only_b), "only in B")) if n]
    if entry.kind_a != entry.kind_b:
        parts.append("kind changed")
    return ", ".join(parts)


def _print_details(entry: Any, verbose: bool) -> None:
    if verbose:
        for name in entry.identical_tensors:
            print(f"  same     {name}")
    for t in entry.differing_tensors:
        print(f"  differ   {t.name}  {t.dtype}{list(t.shape)}: {t.differing} of {t.elements} elements, "
              f"max abs {_number(t.max_abs)}, max rel {_number(t.max_rel)}")
    for c in entry.changed:
        print(f"  changed  {c.name}: {c.a} -> {c.b}")
    for v in entry.values:
        print(f"  value    {v.name}: {_value(v.a, verbose)} -> {_value(v.b, verbose)}")
    for name in entry.only_a:
        print(f"  only A   {name}")
    for name in entry.only_b:
        print(f"  only B   {name}")


def _summary(result: Any) -> str:
    counts = result.counts()
    tensors = counts["identical_tensors"] + counts["differing_tensors"]
    how = "bitwise" if result.atol == 0 else f"within atol {result.atol:g}"
    if result.identical:
        return f"identical ({how}): {_count(tensors, 'tensor')}, {_count(counts['equal_values'], 'value')}"
    parts = [f"{counts['differing_tensors']} of {_count(tensors, 'tensor')} differ"]
    parts += [_count(counts[key], noun) for key, noun in (
        ("changed", "changed dtype, shape or kind"), ("differing_values", "differing value"),
        ("only_a", "only in A"), ("only_b", "only in B")) if counts[key]]
    return f"different ({how}): " + ", ".join(parts)


def _count(n: int, noun: str) -> str:
    """``1 tensor``, ``2 tensors``; a noun that is not one (``only in A``, ``changed``) stays as it is."""
    plural = noun if " in " in noun or noun.startswith("changed") else noun + "s"
    return f"{n} {noun}" if n == 1 else f"{n} {plural}"


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def _value(value: Any, verbose: bool) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        text = f"<int of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if verbose or len(text) <= _CLIP else text[:_CLIP - 3] + "..."
