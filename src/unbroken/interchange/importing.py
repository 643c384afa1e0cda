"""``unbroken.import_checkpoint``: existing torch checkpoints (weights-only) become an unbroken checkpoint."""

from __future__ import annotations

from typing import Any

__all__ = ["import_checkpoint"]


def import_checkpoint(sources: Any, run: Any, **options: Any) -> Any:
    raise NotImplementedError("issue 16: being built")
