"""``unbroken.read_state_dict``: one state entry of a checkpoint as a plain ``dict[str, Tensor]``."""

from __future__ import annotations

from typing import Any

__all__ = ["read_state_dict"]


def read_state_dict(source: Any, entry: str = "model", *, step: int | None = None, device: Any = "cpu",
                    dtype: Any = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    raise NotImplementedError("issue 16: being built")
