"""One entry point from a location (a local path or a URL) to the storage that serves it."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from .base import Storage
from .local import LocalStorage

__all__ = ["open_storage", "is_url"]

# "proto://..." or an fsspec chain "proto::proto://...".  A Windows drive ("C:\\x") has no "//".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")
_LOCAL_SCHEMES = ("file", "local")


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a URL (``s3://bucket/run``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def open_storage(location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 create: bool = True) -> Storage:
    """:class:`LocalStorage` for a path or ``file://`` URL, :class:`FsspecStorage` for any other URL.

    ``storage_options`` go to the fsspec filesystem (credentials, endpoint, ...); they are never stored
    in a checkpoint.  A protocol whose fsspec package is missing raises ImportError naming it.
    """
    if not is_url(location):
        _no_options(location, storage_options)
        return LocalStorage(location, create=create)
    text = os.fspath(location)
    parts = urlsplit(text)
    if parts.scheme.lower() in _LOCAL_SCHEMES and "::" not in text:
        _no_options(text, storage_options)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{text}: a file:// URL must name a local path (file:///abs/path)")
        return LocalStorage(unquote(parts.path), create=create)
    from .remote import FsspecStorage  # fsspec is imported only when a URL needs it

    return FsspecStorage(text, storage_options, create=create)


def _no_options(location: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> None:
    if storage_options:
        raise ValueError(f"{os.fspath(location)}: storage_options apply to URLs (s3://...), not local paths")
