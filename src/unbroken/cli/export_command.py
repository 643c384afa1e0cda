"""``unbroken export SOURCE -o OUT``: a state entry of a checkpoint as plain safetensors.

``-o`` names the output here, as in most tools that write a file; the fsspec storage options that
other commands take as ``-o KEY=VALUE`` are ``--storage-option KEY=VALUE`` here (as for ``import``,
whose ``-o`` is the run), or ``--option``, the other commands' long spelling.  Torch is imported
only when the command runs (``unbroken --help`` stays cheap).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import unbroken
from unbroken.cli.progress import ProgressBars
from unbroken.cli.storage_commands import storage_options
from unbroken.cli.units import format_size

__all__ = ["add_export"]


def add_export(sub: Any) -> None:
    """Registers the ``export`` subcommand."""
    export = sub.add_parser(
        "export", help="write a model's weights from a checkpoint as safetensors (for inference, other tools)",
        description="Write state entry ENTRY (default: model) of a checkpoint as one safetensors file whose "
                    "keys are the module's state_dict() keys, each tensor whole (assembled from every rank's "
                    "file and every sharded piece), or as Hugging Face style shards plus "
                    "<name>.safetensors.index.json when it exceeds --max-shard-size. SOURCE is a checkpoint "
                    "directory, or a run directory (its newest valid checkpoint, or --step N), local or URL. "
                    "Existing files are never overwritten.")
    export.add_argument("source", metavar="SOURCE")
    export.add_argument("-o", "--out", required=True, metavar="OUT",
                        help="the output file (NAME.safetensors), or else a directory (created if need be) to "
                             "hold model.safetensors")
    export.add_argument("--step", type=int, metavar="N", help="the checkpoint of step N of a run directory")
    export.add_argument("--entry", default="model", metavar="NAME",
                        help="the state entry to export (default: model), e.g. ema, ema_0.9999, target_model, "
                             "or a dotted path inside one: ema.module (the model inside an AveragedModel), "
                             "model.encoder (a submodule)")
    export.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="cast the floating-point tensors (integer buffers keep their dtype)")
    export.add_argument("--max-shard-size", metavar="SIZE",
                        help="split into shards of at most SIZE, e.g. 5GB or 500MB (1 GB = 10^9 bytes; GiB is "
                             "binary); a tensor larger than SIZE gets a shard of its own")
    export.add_argument("--storage-option", "--option", dest="option", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="fsspec storage option for a URL SOURCE, e.g. --storage-option "
                             "endpoint_url=http://127.0.0.1:9000 (-o KEY=VALUE of ls and cp; -o is the output here)")
    export.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal)")
    export.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    size: int | str | None = args.max_shard_size
    if isinstance(size, str) and size.strip().isdigit():
        size = int(size)
    try:
        options = storage_options(args, flag="--storage-option")
    except ValueError as exc:
        print(f"unbroken export: error: {exc}", file=sys.stderr)
        return 2
    try:
        with ProgressBars(enabled=not args.no_progress) as bars:
            result = unbroken.export(args.source, args.out, step=args.step, entry=args.entry, dtype=args.dtype,
                                     max_shard_size=size, storage_options=options, progress=bars)
    except FileExistsError as exc:
        print(f"unbroken export: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {result.entry!r} of step {result.step} from {result.checkpoint}")
    for path in result.paths:
        print(f"  {path}")
    print(f"{result.tensors} tensors, {format_size(result.bytes)}")
    return 0
