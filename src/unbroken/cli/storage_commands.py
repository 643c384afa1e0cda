"""Command-line pieces for runs on any storage: ``-o KEY=VALUE`` storage options, ``prune`` and ``cp``.

Like the rest of the CLI, uses only the public API (``unbroken.prune``, ``unbroken.copy_checkpoints``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import unbroken

__all__ = ["add_storage_option", "storage_options", "add_prune", "add_cp"]


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for URLs, e.g. -o endpoint_url=http://127.0.0.1:9000 or "
                             "-o client_kwargs.region_name=eu-west-1 (values are JSON when they parse). "
                             "Credentials come from the usual places (AWS_* variables, ~/.aws)")


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``-o`` options as a nested dict (``a.b=1`` -> ``{"a": {"b": 1}}``); None when there are none."""
    options: dict[str, Any] = {}
    for item in getattr(args, "option", []) or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"-o {item!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node = options
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"-o {item!r}: {part!r} is already a value, not a group")
        node[leaf] = value
    return options or None


# -- prune ----------------------------------------------------------------------------------------------

def add_prune(sub: Any) -> None:
    prune = sub.add_parser("prune", help="delete checkpoints of a run by retention rules (local or URL)",
                           description="Delete the checkpoints of RUN that no rule keeps. The newest valid "
                                       "checkpoint is always kept. Abandoned partial saves are removed too.")
    prune.add_argument("run_dir")
    add_retention_flags(prune)
    prune.add_argument("--invalid", action="store_true", help="also delete checkpoints that fail validation, and those "
                       "quarantined as corrupt")
    prune.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    add_storage_option(prune)
    prune.set_defaults(run=_prune)


# Spellings the flags had before they were generated from the options; still accepted.
_OLD_FLAGS = {"best_metric": ("--metric",), "best_mode": ("--mode",)}


def add_retention_flags(parser: argparse.ArgumentParser) -> None:
    """``--keep-last N`` etc.: one flag per retention option, with the manager option's type, default,
    choices and documentation (defined once, in unbroken/manager/options.py)."""
    from unbroken.manager.options import describe_options  # no torch: see that module
    from unbroken.manager.retention import RETENTION_OPTIONS

    for option in describe_options():
        if option.name in RETENTION_OPTIONS:
            number = option.value_type in (int, float)
            parser.add_argument("--" + option.name.replace("_", "-"), *_OLD_FLAGS.get(option.name, ()),
                                dest=option.name, type=option.value_type, choices=option.choices,
                                default=option.default, metavar="N" if number else None,
                                help=option.plain_doc.replace("%", "%%"))


def _prune(args: argparse.Namespace) -> int:
    from unbroken.manager.retention import RETENTION_OPTIONS

    try:
        result = unbroken.prune(args.run_dir, **{name: getattr(args, name) for name in RETENTION_OPTIONS},
                                invalid=args.invalid, dry_run=args.dry_run, storage_options=storage_options(args))
    except ValueError as exc:
        print(f"unbroken prune: error: {exc}", file=sys.stderr)
        return 2
    verb = "would delete" if args.dry_run else "deleted"
    for record in result.deleted:
        problem = "" if record.valid else f" (invalid: {record.problem})"
        print(f"{verb:<12} step {record.step}{problem}")
    for record, error in result.failed:
        print(f"FAILED       step {record.step}: {error}")
    for name in result.removed_quarantined:
        print(f"{verb:<12} {name} (quarantined as corrupt)")
    for leftover in result.removed_partial:
        print(f"removed      {leftover} (abandoned partial save)")
    print(f"kept {len(result.kept)} checkpoint(s): {[r.step for r in result.kept]}")
    return 1 if result.failed else 0


# -- cp -------------------------------------------------------------------------------------------------

def add_cp(sub: Any) -> None:
    cp = sub.add_parser("cp", help="copy checkpoints between runs (local paths or URLs), verified",
                        description="Copy the valid checkpoints of run SRC (or only --step N) into run DST. "
                                    "Each copy is committed at DST like a save (manifest last); steps DST "
                                    "already has are skipped.")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("--step", type=int, help="copy only this step")
    cp.add_argument("--latest", action="store_true", help="copy only the newest valid checkpoint")
    cp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_option(cp)
    cp.set_defaults(run=_cp)


def _cp(args: argparse.Namespace) -> int:
    try:
        options = storage_options(args)
    except ValueError as exc:
        print(f"unbroken cp: error: {exc}", file=sys.stderr)
        return 2
    bars: list[_ProgressBar] = []

    def progress(name: str, total: int) -> Callable[[int], None] | None:
        for bar in bars:
            bar.close()
        bars[:] = [_ProgressBar(name, total, enabled=not args.no_progress)]
        return bars[0].update

    try:
        results = unbroken.copy_checkpoints(args.src, args.dst, step=args.step, latest=args.latest,
                                            storage_options=options, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if not results:
        print(f"no valid checkpoint to copy in {args.src}", file=sys.stderr)
        return 1
    for result in results:
        if result.copied:
            print(f"copied   {result.name}  {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s "
                  f"({result.mb_per_s:.0f} MB/s)")
        else:
            print(f"present  {result.name}  (already committed at {args.dst})")
    return 0


class _ProgressBar:
    """A tqdm bar on stderr when tqdm is installed and asked for; otherwise nothing."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
