"""``unbroken.export``: a state entry of a checkpoint as plain safetensors (one file or HF-style shards)."""

from __future__ import annotations

from typing import Any

__all__ = ["export"]


def export(source: Any, out: Any, **options: Any) -> Any:
    raise NotImplementedError("issue 16: being built")
