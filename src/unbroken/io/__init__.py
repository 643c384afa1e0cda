"""Moving checkpoint bytes: streaming writes with checksums, staging for async saves, verified reads."""

from __future__ import annotations

from .host_buffers import HostStager, StagedSave
from .plan import FilePlan, live_runs
from .reader import mapped_tensors, read_manifest, read_manifest_bytes, read_tensors, verify_checkpoint
from .writer import AsyncWriter, SyncWriter, Writer, write_checkpoint

__all__ = ["mapped_tensors", "read_manifest", "read_manifest_bytes", "read_tensors", "verify_checkpoint",
           "write_checkpoint", "Writer", "SyncWriter", "AsyncWriter", "FilePlan", "live_runs", "HostStager",
           "StagedSave"]
