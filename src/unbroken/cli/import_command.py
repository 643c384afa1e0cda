"""``unbroken import SOURCE... -o RUN [--step N]``: existing torch checkpoints become a checkpoint of RUN.

``-o`` names the output run here, as in ``export``; the storage options that ``-o KEY=VALUE`` passes
to the other commands are ``--storage-option KEY=VALUE`` for this one.  torch is imported only when
the command runs (``unbroken.import_checkpoint`` is reached through the lazy package).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import unbroken
from unbroken.cli.progress import ProgressBars
from unbroken.cli.storage_commands import storage_options

__all__ = ["add_import"]

_RNG_ENTRY = "unbroken.rng"


def add_import(sub: Any) -> None:
    """Registers the ``import`` subcommand."""
    command = sub.add_parser(
        "import", help="turn existing torch checkpoints (.pt/.pth/.bin/.ckpt, HF Trainer checkpoint-N/) into a "
                       "checkpoint a CheckpointManager resumes from",
        description="Import the checkpoint files of one training step as checkpoint step_N of RUN: a plain "
                    "state_dict, a dict of state_dicts (MiniMind), a Lightning .ckpt, a Hugging Face Trainer "
                    "checkpoint-N directory, or the consistency-models files (model/ema_<rate>/opt/"
                    "target_model<step>.pt). Files are loaded with torch.load(weights_only=True) only. "
                    "Nothing is overwritten.",
        epilog="Formats, entry names and what is kept from each: docs/IMPORT.md.")
    command.add_argument("sources", nargs="+", metavar="SOURCE", help="a checkpoint file or directory (local)")
    command.add_argument("-o", "--output", dest="run_dir", metavar="RUN", required=True,
                         help="the run directory (local or URL) to write step_N into; created if missing")
    command.add_argument("--step", type=int, metavar="N",
                         help="the step to record (default: read from the files' contents or names)")
    command.add_argument("--storage-option", dest="option", action="append", default=[], metavar="KEY=VALUE",
                         help="fsspec storage option for a URL RUN, e.g. --storage-option "
                              "endpoint_url=http://127.0.0.1:9000 (values are JSON when they parse)")
    command.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal)")
    command.set_defaults(run=_import)


def _import(args: argparse.Namespace) -> int:
    try:
        options = storage_options(args, flag="--storage-option")
    except ValueError as exc:
        print(f"unbroken import: error: {exc}", file=sys.stderr)
        return 2
    with ProgressBars(enabled=not args.no_progress) as bars:
        record = unbroken.import_checkpoint(args.sources, args.run_dir, step=args.step, storage_options=options,
                                            progress=bars)
    info = unbroken.read_info(record.path, options)
    imported = (info.manifest.metadata or {}).get("imported", {}) if isinstance(info.manifest.metadata, dict) else {}
    print(f"imported step {record.step} ({imported.get('step_from', '')}) as {record.path}")
    for key, (kind, _) in info.state.items():
        label = "RNG streams (restore() sets them)" if key == _RNG_ENTRY else kind
        print(f"  {key:<16} {label}")
    for note in imported.get("notes", []):
        print(f"  note: {note}")
    names = ", ".join(f'"{k}": ...' for k in info.state if k != _RNG_ENTRY)
    print(f"resume with CheckpointManager({args.run_dir!r}, state={{{names}}}).restore()")
    return 0
