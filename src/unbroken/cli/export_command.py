"""``unbroken export``."""

from __future__ import annotations

from typing import Any

__all__ = ["add_export"]


def add_export(sub: Any) -> None:
    """Registers the ``export`` subcommand (being built, issue 16)."""
