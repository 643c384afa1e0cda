"""``unbroken.diff``: what differs between two checkpoints, entry by entry."""

from __future__ import annotations

from typing import Any

__all__ = ["diff"]


def diff(a: Any, b: Any, **options: Any) -> Any:
    raise NotImplementedError("issue 16: being built")
