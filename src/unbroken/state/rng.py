"""The random streams training depends on: Python ``random``, NumPy's global generator, torch CPU and
every initialised CUDA device.  Captured on every save without user code, restored last on resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .._internal.warn import warn

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    streams: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    # An uninitialised CUDA context has generated nothing yet; initialising it here would cost
    # hundreds of MB of GPU memory in a CPU-only job on a GPU machine.
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        streams["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return streams


def restore_rng(streams: dict[str, Any]) -> None:
    if "python" in streams:
        random.setstate(_as_python_state(streams["python"]))
    if "numpy" in streams:
        np.random.set_state(streams["numpy"])
    if "torch" in streams:
        torch.set_rng_state(_standalone(streams["torch"]))
    if "cuda" in streams:
        _restore_cuda(streams["cuda"])


def _standalone(state: torch.Tensor) -> torch.Tensor:
    """A fresh copy: a loaded tensor may be a view into a larger read buffer, and the generators'
    set_state reads raw memory assuming a tensor that owns its storage (a view crashes torch)."""
    return state.detach().clone(memory_format=torch.contiguous_format)


def _as_python_state(state: Any) -> Any:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        warn("the checkpoint holds CUDA RNG states but no GPU is available; they were not restored", UserWarning)
        return
    count = torch.cuda.device_count()
    if count != len(states):
        warn(f"the checkpoint holds {len(states)} CUDA RNG states but {count} GPUs are visible; "
             f"restoring the first {min(count, len(states))}", UserWarning)
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(_standalone(state), index)


def validate_rng(streams: Any) -> None:
    """Check saved streams by loading them into scratch generators, so a crafted checkpoint fails
    before anything is restored (and the live generators are never left half-set)."""
    from ..errors import CorruptCheckpointError

    try:
        if not isinstance(streams, dict):
            raise TypeError("not a dict of streams")
        if "python" in streams:
            random.Random().setstate(_as_python_state(streams["python"]))
        if "numpy" in streams:
            np.random.RandomState().set_state(streams["numpy"])
        for state in [streams.get("torch")] + list(streams.get("cuda") or []):
            if state is not None and not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8):
                raise TypeError("torch RNG states must be uint8 tensors")
        if "torch" in streams:
            torch.Generator().set_state(_standalone(streams["torch"]))
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptCheckpointError(f"the saved RNG streams are malformed ({exc})") from None
