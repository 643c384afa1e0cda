"""Command-line pieces for runs on any storage: ``-o KEY=VALUE`` storage options, ``prune`` and ``cp``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .errors import UnbrokenError
from .records import CheckpointRecord, scan
from .resume import open_run
from .retention import Candidate, KeepBest, KeepEvery, KeepLast, RetentionPolicy, steps_to_keep
from .runlock import RunLock
from .storage import LocalStorage, Storage, is_url, step_name
from .transfer import copy_checkpoint

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


def _options_for(location: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    return options if is_url(location) else None


# -- prune ----------------------------------------------------------------------------------------------

def add_prune(sub: Any) -> None:
    prune = sub.add_parser("prune", help="delete checkpoints of a run by retention rules (local or URL)",
                           description="Delete the checkpoints of RUN that no rule keeps. The newest valid "
                                       "checkpoint is always kept. Abandoned partial saves are removed too.")
    prune.add_argument("run_dir")
    prune.add_argument("--keep-last", type=int, metavar="N")
    prune.add_argument("--keep-best", type=int, metavar="N")
    prune.add_argument("--metric", help="metric that ranks checkpoints for --keep-best")
    prune.add_argument("--mode", choices=("min", "max"), default="min")
    prune.add_argument("--keep-every", type=int, metavar="N", help="keep steps that are multiples of N")
    prune.add_argument("--invalid", action="store_true", help="also delete checkpoints that fail validation")
    prune.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    add_storage_option(prune)
    prune.set_defaults(run=_prune)


def _policies(args: argparse.Namespace) -> list[RetentionPolicy]:
    policies: list[RetentionPolicy] = []
    if args.keep_last is not None:
        policies.append(KeepLast(args.keep_last))
    if args.keep_best is not None:
        if not args.metric:
            raise ValueError("--keep-best needs --metric NAME")
        policies.append(KeepBest(args.keep_best, args.metric, args.mode))
    if args.keep_every is not None:
        policies.append(KeepEvery(args.keep_every))
    return policies


def _prune(args: argparse.Namespace) -> int:
    try:
        policies = _policies(args)
        options = storage_options(args)
    except ValueError as exc:
        print(f"unbroken prune: error: {exc}", file=sys.stderr)
        return 2
    if not policies and not args.invalid:
        print("unbroken prune: error: give a rule (--keep-last, --keep-best, --keep-every) or --invalid",
              file=sys.stderr)
        return 2
    storage = open_run(args.run_dir, _options_for(args.run_dir, options))
    lock = RunLock(storage.root) if isinstance(storage, LocalStorage) else None
    if lock is not None:
        lock.acquire(0)  # a running manager applies its own retention: never prune under it
    try:
        return _prune_storage(storage, policies, args.invalid, args.dry_run)
    finally:
        if lock is not None:
            lock.release()


def _prune_storage(storage: Storage, policies: list[RetentionPolicy], invalid: bool, dry_run: bool) -> int:
    records = scan(storage)
    valid = [r for r in records if r.valid]
    keep = steps_to_keep([Candidate(r.step, r.metrics) for r in valid], policies) if policies else {
        r.step for r in valid}
    doomed: list[CheckpointRecord] = [r for r in valid if r.step not in keep]
    doomed += [r for r in records if not r.valid] if invalid else []
    verb = "would delete" if dry_run else "deleted"
    failed = 0
    for record in sorted(doomed, key=lambda r: r.step):
        if not dry_run:
            try:
                storage.delete(step_name(record.step))
            except OSError as exc:
                failed += 1
                print(f"FAILED   step {record.step}: {exc}")
                continue
        print(f"{verb:<12} step {record.step}{'' if record.valid else ' (invalid: ' + str(record.problem) + ')'}")
    if not dry_run:
        for leftover in storage.cleanup():
            print(f"removed      {leftover} (abandoned partial save)")
    kept = sorted(r.step for r in valid if r not in doomed)
    print(f"kept {len(kept)} checkpoint(s): {kept}")
    return 1 if failed else 0


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
    source = open_run(args.src, _options_for(args.src, options))
    dest = open_run(args.dst if is_url(args.dst) else os.path.abspath(args.dst), _options_for(args.dst, options),
                    create=True)
    steps = sorted(r.step for r in scan(source) if r.valid)
    if args.step is not None:
        steps = [s for s in steps if s == args.step]
    elif args.latest:
        steps = steps[-1:]
    if not steps:
        print(f"no valid checkpoint to copy in {source.url}", file=sys.stderr)
        return 1
    failed = 0
    for step in steps:
        failed += _copy_one(source, dest, step, show_progress=not args.no_progress)
    return 1 if failed else 0


def _copy_one(source: Storage, dest: Storage, step: int, show_progress: bool) -> int:
    name = step_name(step)
    total = sum(r.size for r in scan(source) if r.step == step)
    with _progress_bar(name, total, show_progress) as advance:
        try:
            result = copy_checkpoint(source, dest, name, verify_source=not is_url(source.url),
                                     progress=advance)
        except (OSError, UnbrokenError) as exc:
            print(f"FAILED   {name}: {exc}", file=sys.stderr)
            return 1
    if result.copied:
        print(f"copied   {name}  {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s ({result.mb_per_s:.0f} MB/s)")
    else:
        print(f"present  {name}  (already committed at {dest.url})")
    return 0


class _progress_bar:  # noqa: N801 - used as a context manager like a function
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

    def __enter__(self) -> Any:
        return self.bar.update if self.bar is not None else None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

