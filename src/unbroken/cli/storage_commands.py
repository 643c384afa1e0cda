"""Command-line pieces for runs on any storage: ``-o KEY=VALUE`` storage options, ``prune`` and ``cp``.

Like the rest of the CLI, uses only the public API (``unbroken.prune``, ``unbroken.copy_checkpoints``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import unbroken
from unbroken.cli.progress import ProgressBars
from unbroken.cli.units import format_size

__all__ = ["add_storage_option", "storage_options", "add_prune", "add_cp"]


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for URLs, e.g. -o endpoint_url=http://127.0.0.1:9000 or "
                             "-o client_kwargs.region_name=eu-west-1 (values are JSON when they parse). "
                             "Credentials come from the usual places (AWS_* variables, ~/.aws)")


def storage_options(args: argparse.Namespace, flag: str = "-o") -> dict[str, Any] | None:
    """The storage options as a nested dict (``a.b=1`` -> ``{"a": {"b": 1}}``); None when there are none.
    ``flag`` is the command's spelling of the option, named in errors (``--storage-option`` where
    ``-o`` is the output)."""
    options: dict[str, Any] = {}
    for item in getattr(args, "option", []) or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node = options
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{flag} {item!r}: {part!r} is already a value, not a group")
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
    from unbroken.cli.targets import check_exists
    from unbroken.manager.retention import RETENTION_OPTIONS, policies_from

    rules = {name: getattr(args, name) for name in RETENTION_OPTIONS}
    try:
        if not policies_from(**rules) and not args.invalid:
            raise ValueError("prune needs a rule: --keep-last N, --keep-best N --best-metric NAME, --keep-every N "
                             "or --invalid (see unbroken prune --help)")
        check_exists(args.run_dir)
        result = unbroken.prune(args.run_dir, **rules, invalid=args.invalid, dry_run=args.dry_run,
                                storage_options=storage_options(args))
    except ValueError as exc:
        print(f"unbroken prune: error: {_as_flags(str(exc), RETENTION_OPTIONS)}", file=sys.stderr)
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


def _as_flags(message: str, names: Any) -> str:
    """The library names its Python arguments (``keep_best``); on the command line they are flags."""
    pattern = r"\b(" + "|".join(re.escape(name) for name in names) + r")\b"
    return re.sub(pattern, lambda found: "--" + found.group(1).replace("_", "-"), message)


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
    from unbroken.cli.targets import check_exists

    try:
        options = storage_options(args)
    except ValueError as exc:
        print(f"unbroken cp: error: {exc}", file=sys.stderr)
        return 2
    check_exists(args.src)
    # A bar appears when a checkpoint's first bytes move: none for a step DST already has.
    with ProgressBars(enabled=not args.no_progress) as bars:
        results = unbroken.copy_checkpoints(args.src, args.dst, step=args.step, latest=args.latest,
                                            storage_options=options, progress=bars)
    if not results:
        print(f"no valid checkpoint to copy in {args.src}", file=sys.stderr)
        return 1
    for result in results:
        if result.copied:
            print(f"copied   {result.name}  {format_size(result.bytes)} in {result.seconds:.1f} s "
                  f"({format_size(round(result.bytes / result.seconds)) if result.seconds > 0 else '-'}/s)")
        else:
            print(f"present  {result.name}  (already committed at {args.dst})")
    return 0
