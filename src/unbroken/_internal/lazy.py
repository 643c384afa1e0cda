"""Names a package exports but imports only on first use (PEP 562), so importing the package stays cheap.

``unbroken``, ``unbroken.io``, ``unbroken.storage`` and ``unbroken.format`` re-export names whose
modules import torch or fsspec; a command that never touches those names (``unbroken ls``,
``unbroken run``) never imports them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each name of ``modules`` (name -> the
    submodule, relative to ``package``, that defines it) on first access; other names raise
    AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    return __getattr__
