"""Where checkpoint bytes live: a small byte-level interface and its local POSIX implementation.

:class:`FsspecStorage` (object storage) is imported on first use (PEP 562): local runs never load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._internal.lazy import lazy_attributes
from .base import ReadHandle, Staging, Storage, WriteHandle, parse_step_name, step_name
from .local import LocalStorage
from .opening import is_url, open_storage

if TYPE_CHECKING:
    from .remote import FsspecStorage

__all__ = ["Storage", "Staging", "ReadHandle", "WriteHandle", "LocalStorage", "step_name", "parse_step_name",
           "FsspecStorage", "open_storage", "is_url"]

__getattr__ = lazy_attributes(__name__, {"FsspecStorage": "remote"})
