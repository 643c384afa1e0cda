"""Where checkpoint bytes live: a small byte-level interface and its local POSIX implementation."""

from __future__ import annotations

from .base import ReadHandle, Staging, Storage, WriteHandle, parse_step_name, step_name
from .local import LocalStorage
from .opening import is_url, open_storage
from .remote import FsspecStorage

__all__ = ["Storage", "Staging", "ReadHandle", "WriteHandle", "LocalStorage", "step_name", "parse_step_name",
           "FsspecStorage", "open_storage", "is_url"]
