"""Moving checkpoint bytes: streaming writes with checksums, staging for async saves, verified reads.

Reading manifests and verifying checksums (:mod:`.reader`) is torch-free; the writing side imports
torch, so its names are imported on first use (PEP 562) and ``unbroken ls``/``verify`` skip it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._internal.lazy import lazy_attributes
from .reader import mapped_tensors, read_manifest, read_manifest_bytes, read_tensors, verify_checkpoint

if TYPE_CHECKING:
    from .host_buffers import BufferedSave, HostBuffers
    from .plan import FilePlan, live_runs
    from .writer import AsyncWriter, SyncWriter, Writer, write_checkpoint

__all__ = ["mapped_tensors", "read_manifest", "read_manifest_bytes", "read_tensors", "verify_checkpoint",
           "write_checkpoint", "Writer", "SyncWriter", "AsyncWriter", "FilePlan", "live_runs", "HostBuffers",
           "BufferedSave"]

# name -> the submodule that defines it
_LAZY = {"HostBuffers": "host_buffers", "BufferedSave": "host_buffers", "FilePlan": "plan", "live_runs": "plan",
         "write_checkpoint": "writer", "Writer": "writer", "SyncWriter": "writer", "AsyncWriter": "writer"}

__getattr__ = lazy_attributes(__name__, _LAZY)
