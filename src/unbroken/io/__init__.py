"""Moving checkpoint bytes: streaming writes with checksums, verified reads, the writer interface."""

from __future__ import annotations

from .reader import read_manifest, read_tensors, verify_checkpoint
from .writer import SyncWriter, Writer, write_checkpoint

__all__ = ["read_manifest", "read_tensors", "verify_checkpoint", "write_checkpoint", "Writer", "SyncWriter"]
