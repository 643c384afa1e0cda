"""``unbroken import``."""

from __future__ import annotations

from typing import Any

__all__ = ["add_import"]


def add_import(sub: Any) -> None:
    """Registers the ``import`` subcommand (being built, issue 16)."""
