"""``unbroken diff``."""

from __future__ import annotations

from typing import Any

__all__ = ["add_diff"]


def add_diff(sub: Any) -> None:
    """Registers the ``diff`` subcommand (being built, issue 16)."""
