"""The ``unbroken`` command line: ``ls``, ``show``, ``verify``, ``prune``, ``cp`` and ``run``.

Every run or checkpoint argument may be a local path or a URL (``s3://bucket/run``); ``-o KEY=VALUE``
passes fsspec storage options (an endpoint, a region) for URLs.

Start-up stays cheap: library names are reached through the lazy ``unbroken`` package or imported by
the command that runs, so ``--help``, ``--version``, ``run``, ``ls`` and ``verify`` never import torch
(tests/cli/test_imports.py).

Output into a pipe that closes early (``unbroken ls --json | head``) ends the command quietly, as Unix
tools end: no traceback, no message, exit status 141 (128 + SIGPIPE, what a shell reports for a tool
that SIGPIPE ended; ``set -o pipefail`` sees it as for ``seq 1000000 | head -1``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import unbroken
from unbroken.cli.check_command import add_check
from unbroken.cli.diff_command import add_diff
from unbroken.cli.export_command import add_export
from unbroken.cli.import_command import add_import
from unbroken.cli.progress import ProgressBars
from unbroken.cli.report_command import add_report
from unbroken.cli.storage_commands import add_cp, add_prune, add_storage_option, storage_options
from unbroken.cli.targets import check_exists, checkpoint_of, is_checkpoint, no_checkpoints
from unbroken.cli.units import format_size

__all__ = ["main"]

_LIST_PREVIEW = 6
EXIT_PIPE_CLOSED = 141
"""The exit status when the reader of our output went away: 128 + SIGPIPE, as for a tool SIGPIPE ended."""


def main(argv: Sequence[str] | None = None) -> int:
    _escape_unprintable_output()
    try:
        try:
            code = _dispatch(_parser().parse_args(argv))
        finally:  # also after --help (SystemExit): what is still buffered goes out here, or fails here
            sys.stdout.flush()
    except BrokenPipeError:
        return _output_closed()
    return code


def _output_closed() -> int:
    """Stop quietly after the reader of stdout went away.  Storage failures reach here translated
    (StorageError), so a BrokenPipeError is our own output's.  stdout is pointed at /dev/null so that
    Python's last flush of what is still buffered cannot fail, and print a traceback, a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout has no file descriptor (captured in-process): nothing to flush
        pass
    return EXIT_PIPE_CLOSED


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(args.run(args))
    except BrokenPipeError:
        raise
    except (unbroken.CheckpointNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except unbroken.UnbrokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as exc:  # a bad -o option or URL, a missing fsspec backend
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. an OSError reading a damaged checkpoint: a message, never a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _escape_unprintable_output() -> None:
    """Names come from manifests, which anyone can write: JSON allows a lone surrogate ("\\udc80"),
    which no encoding can print.  Such characters are shown escaped (``\\udc80``) instead of ending
    the command with a UnicodeEncodeError, in every message and table alike."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(errors="backslashreplace")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unbroken", description="Inspect, verify, prune and copy unbroken "
                                     "checkpoints; supervise a training command.")
    parser.add_argument("--version", action="version", version=f"unbroken {unbroken.__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="list the checkpoints of a run directory (or describe one checkpoint)",
                        epilog="Exit status: 0 all listed are valid; 1 one is not, or there are no checkpoints; "
                               "2 no such path. --json: metrics are JSON numbers at full precision; a "
                               'non-finite one is the string "nan", "inf" or "-inf" (float() reads it back).')
    ls.add_argument("run_dir", metavar="PATH", help="a run directory, or one checkpoint directory")
    ls.add_argument("--verify", action="store_true", help="check every checksum (reads all data)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add_storage_option(ls)
    ls.set_defaults(run=_ls)
    show = sub.add_parser("show", help="show a checkpoint's state tree with shapes, dtypes and sizes")
    show.add_argument("checkpoint", metavar="PATH", help="a checkpoint directory, or a run directory (its newest "
                                                         "valid checkpoint, or --step N)")
    show.add_argument("--step", type=int, metavar="N", help="with a run directory: show its checkpoint of step N")
    show.add_argument("--values", action="store_true", help="print every non-tensor value in full")
    add_storage_option(show)
    show.set_defaults(run=_show)
    verify = sub.add_parser("verify", help="check every byte of a checkpoint (or of every checkpoint of a run)")
    verify.add_argument("path")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal)")
    verify.add_argument("--quarantine", action="store_true",
                        help="move the corrupt checkpoints of a run out of the way (corrupt-step_N-...), as "
                             "restore does: never restored or counted again, their steps can be saved anew")
    add_storage_option(verify)
    verify.set_defaults(run=_verify)
    add_prune(sub)
    add_cp(sub)
    add_export(sub)
    add_import(sub)
    add_diff(sub)
    add_check(sub)
    add_report(sub)
    _add_run(sub)
    return parser


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="run a training command; restart it after a crash",
        usage="unbroken run [--dir RUN_DIR] [--max-restarts N] [--backoff SECONDS] [--max-backoff SECONDS] "
              "-- COMMAND ...",
        description="Run COMMAND, restart it after a crash with exponential backoff, forward SIGTERM, "
                    "SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to it, and exit with its final status.",
        epilog=f"Exit status: the child's. 0: done. {unbroken.EXIT_PREEMPTED}: the child was pre-empted and saved; "
               "not restarted, requeue the job. Other: a crash, restarted unless a stop signal came or "
               "--max-restarts restarts in a row made no progress. 2: bad options. See docs/PREEMPTION.md.")
    run.add_argument("--dir", dest="run_dir", metavar="RUN_DIR",
                     help="the run directory the command checkpoints into; progress = a newer valid checkpoint "
                          "there (without it every restart counts as one without progress)")
    run.add_argument("--max-restarts", type=int, default=3, metavar="N",
                     help="restarts in a row without progress before giving up (default: 3)")
    run.add_argument("--backoff", type=float, default=1.0, metavar="SECONDS",
                     help="wait before a restart; doubles with each restart in a row without progress (default: 1)")
    run.add_argument("--max-backoff", type=float, default=60.0, metavar="SECONDS",
                     help="the longest wait before a restart (default: 60)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after '--'")
    run.set_defaults(run=_run)


def _ls(args: argparse.Namespace) -> int:
    options = storage_options(args)
    check_exists(args.run_dir)
    if is_checkpoint(args.run_dir, options):  # one checkpoint: its row, as in a listing of its run
        records = [_one_record(args.run_dir, args.verify, options)]
    else:
        records = unbroken.list_checkpoints(args.run_dir, verify=args.verify, storage_options=options,
                                            quarantined=True)
    # A quarantined checkpoint is damage already dealt with: listed, but not a reason to fail.
    ok = bool(records) and all(r.valid or r.quarantined for r in records)
    if args.json:
        print(json.dumps([_record_json(r, args.verify) for r in records], indent=1, allow_nan=False))
        if not records:
            print(no_checkpoints(args.run_dir), file=sys.stderr)
        return 0 if ok else 1
    if not records:
        print(no_checkpoints(args.run_dir), file=sys.stderr)
        return 1
    rows = [("STEP", "AGE", "SIZE", "VALID", "METRICS")]
    for r in records:
        metrics = " ".join(f"{_text(k)}={_number(v)}" for k, v in r.metrics.items())
        if r.quarantined:
            metrics = r.path.rsplit("/", 1)[-1]
        rows.append((str(r.step), _age(r.created), format_size(r.size) if not r.quarantined else "-",
                     _status(r, args.verify), metrics))
    _print_table(rows)
    for r in records:
        if not r.valid:
            print(f"step {r.step}: {r.problem}", file=sys.stderr)
    return 0 if ok else 1


def _one_record(path: str, verify: bool, options: dict[str, Any] | None) -> unbroken.CheckpointRecord:
    """The row of checkpoint ``path``: its manifest (every byte with ``verify``), or why it is not valid."""
    try:
        if verify:
            return unbroken.verify(path, options)
        info = unbroken.read_info(path, options)
    except unbroken.CorruptCheckpointError as exc:
        return unbroken.CheckpointRecord(step=_step_of(path), path=path, valid=False, problem=str(exc))
    m = info.manifest
    return unbroken.CheckpointRecord(step=m.step, path=path, created=m.created, size=m.total_bytes,
                                     metrics=info.metrics)


def _status(record: unbroken.CheckpointRecord, verified: bool) -> str:
    """The VALID column.  "yes" is a promise that every byte matched its checksum, so only --verify
    gives it; without it only the manifest was read and checked."""
    if record.quarantined:
        return "quarantined"
    if not record.valid:
        return "NO"
    return "yes" if verified else "unverified"


def _record_json(r: unbroken.CheckpointRecord, verified: bool) -> dict[str, Any]:
    return {"step": r.step, "path": r.path, "created": _json_number(r.created), "size": r.size, "valid": r.valid,
            "verified": verified and r.valid, "quarantined": r.quarantined, "problem": r.problem,
            "metrics": {k: _json_number(v) for k, v in r.metrics.items()}}


def _json_number(value: Any) -> Any:
    """A value for --json: numbers stay numbers at full precision; a non-finite float, which JSON
    cannot hold, is the string "nan", "inf" or "-inf" (float() reads it back); None is null; what a
    foreign manifest holds instead is text, as in the table."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if value is None:
        return None
    return _number(value)


def _show(args: argparse.Namespace) -> int:
    options = storage_options(args)
    path = checkpoint_of(args.checkpoint, args.step, options)
    info = unbroken.read_info(path, options)
    m = info.manifest
    print(f"checkpoint {path}")
    print(f"  step {m.step}, created {_time(m.created)}, {format_size(m.total_bytes)} in {len(m.files)} file(s), "
          f"{len(m.tensors)} tensors, format {m.format_version}, world size {m.world_size}")
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    if info.metrics:
        print("  metrics: " + ", ".join(f"{_text(k)}={_number(v)}" for k, v in info.metrics.items()))
    if m.metadata is not None:
        print(f"  metadata: {_clip(json.dumps(m.metadata), args.values)}")
    for key, (kind, value) in info.state.items():
        tensors = list(_tensors(value))
        print(f"{key}  ({kind}, {len(tensors)} tensors, {format_size(sum(t.nbytes for t in tensors))})")
        _show_tree(value, "  ", args.values)
    return 0


def _time(created: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(created).isoformat(sep=" ", timespec="seconds")
    except (OverflowError, ValueError, OSError):  # a manifest may say any finite number
        return f"{created!r} (not a valid time)"


def _show_tree(value: Any, indent: str, full: bool) -> None:
    children = _children(value)
    if children is None:
        print(f"{indent}{_leaf(value, full)}")
        return
    for key, child in children:
        if _children(child):
            print(f"{indent}{_text(key)}/")
            _show_tree(child, indent + "  ", full)
        else:
            print(f"{indent}{_text(key)}: {_leaf(child, full)}")


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    """Containers holding tensors are expanded; anything else prints as one value."""
    if isinstance(value, dict) and (value and any(True for _ in _tensors(value)) or len(value) > 1):
        return list(value.items())
    if isinstance(value, (list, tuple)) and any(True for _ in _tensors(value)):
        return list(enumerate(value))
    return None


def _leaf(value: Any, full: bool) -> str:
    if isinstance(value, unbroken.TensorInfo):
        return f"{value.dtype} {list(value.shape)}  {format_size(value.nbytes)}"
    if not full and isinstance(value, (list, tuple)) and len(value) > _LIST_PREVIEW:
        return f"<{type(value).__name__} of {len(value)} items>"
    return _clip(_text(value, repr), full)


def _text(value: Any, convert: Callable[[Any], str] = str) -> str:
    """``convert(value)``, or a stand-in for an int too long to print (Python refuses to turn one of
    more than 4300 digits into text; a manifest may hold one)."""
    try:
        return convert(value)
    except ValueError:
        if isinstance(value, int):
            return f"<int of {value.bit_length()} bits>"
        return f"<{type(value).__name__} holding an int too long to print>"


def _clip(text: str, full: bool) -> str:
    return text if full or len(text) <= 120 else text[:117] + "..."


def _tensors(value: Any) -> Iterator[unbroken.TensorInfo]:
    if isinstance(value, unbroken.TensorInfo):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _verify(args: argparse.Namespace) -> int:
    options = storage_options(args)
    check_exists(args.path)
    if is_checkpoint(args.path, options):
        targets = [args.path]
    else:
        targets = [r.path for r in unbroken.list_checkpoints(args.path, storage_options=options)]
        if not targets:
            print(no_checkpoints(args.path), file=sys.stderr)
            return 1
    bad = unreadable = 0
    corrupt: list[int] = []
    for target in targets:
        try:
            with ProgressBars(enabled=not args.no_progress) as bars:
                record = unbroken.verify(target, options, progress=bars)
            print(f"OK       {target}  step {record.step}, {format_size(record.size)} verified")
        except (unbroken.CorruptCheckpointError, unbroken.CheckpointNotFoundError) as exc:
            bad += 1
            corrupt.append(_step_of(target))
            print(f"CORRUPT  {target}: {exc}")
        except OSError as exc:  # not proven corrupt (a permission, a network error), but not verified either
            unreadable += 1
            print(f"UNREADABLE  {target}: {type(exc).__name__}: {exc}")
    unread = f", {unreadable} unreadable" if unreadable else ""
    print(f"{len(targets) - bad - unreadable} valid, {bad} corrupt{unread}")
    if args.quarantine and bad:
        if len(targets) == 1 and targets[0] == args.path:
            print("--quarantine applies to a run directory, not to one checkpoint", file=sys.stderr)
            return 2
        for step, name, _ in unbroken.quarantine_corrupt(args.path, corrupt, storage_options=options):
            print(f"quarantined step {step} as {name}")
    return 1 if bad or unreadable else 0


def _step_of(path: str) -> int:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return int(name[len("step_"):]) if name.startswith("step_") and name[len("step_"):].isdigit() else -1


def _run(args: argparse.Namespace) -> int:
    from unbroken.cli.supervisor import SupervisorConfig, supervise

    # argparse keeps the "--" that separates our options from the command on some Python versions.
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        config = SupervisorConfig(run_dir=args.run_dir, max_restarts=args.max_restarts, backoff=args.backoff,
                                  max_backoff=args.max_backoff)
        if not command:
            raise ValueError("no command to run: give it after '--', e.g. unbroken run -- python train.py")
    except ValueError as exc:
        print(f"unbroken run: error: {exc}", file=sys.stderr)
        return 2
    return supervise(command, config)


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _number(value: Any) -> Any:
    """A metric for the table and for --json: a float to 6 digits, an int as it is, a missing one
    (None, which metrics may hold) as "-".  unbroken writes no other metrics; whatever a foreign
    manifest holds instead is shown as text, so it cannot fail either."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool) and _text(value).lstrip("-").isdigit():
        return value
    return _text(value, repr)


def _age(created: float | None) -> str:
    if created is None or not math.isfinite(created):
        return "-"
    seconds = max(0.0, time.time() - created)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"

