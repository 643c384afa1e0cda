"""Finding what to resume from: the newest checkpoint that validates, skipping broken ones loudly."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from .._internal.warn import warn
from ..errors import CheckpointNotFoundError, CheckpointSkippedWarning, CorruptCheckpointError, PartialRestoreError
from ..format import Manifest
from ..storage import Storage, step_name
from ..storage.paths import committed_steps
from .single import load_checkpoint

__all__ = ["restore_newest", "restore_step"]


def restore_newest(storage: Storage, state: MutableMapping[str, Any], strict: bool, rng: bool) -> Manifest | None:
    """Restore the newest valid checkpoint; ``None`` when there is none.

    A corrupt checkpoint is skipped with a :class:`CheckpointSkippedWarning`; a checkpoint that does
    not match the live objects raises, because an older one would not match either.
    """
    partial: PartialRestoreError | None = None
    for step in reversed(committed_steps(storage)):
        name = step_name(step)
        try:
            manifest = load_checkpoint(storage, name, state, strict=strict, rng=rng)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if isinstance(exc, PartialRestoreError):
                partial = exc  # an older checkpoint overwrites every entry again; a fresh start would not
            message = f"skipping checkpoint {storage.url}/{name}: {exc}"
            warn(message, CheckpointSkippedWarning)
            continue
        if manifest.step != step:
            raise CorruptCheckpointError(f"{storage.url}/{name}: manifest says step {manifest.step}")
        return manifest
    if partial is not None:
        raise partial
    return None


def restore_step(storage: Storage, step: int, state: MutableMapping[str, Any], strict: bool, rng: bool) -> Manifest:
    """Restore exactly ``step``; a clear error (never a silent fallback) if it is missing or broken."""
    name = step_name(step)
    if not storage.exists(name):
        available = committed_steps(storage)
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {storage.url}; available steps: "
                                      f"{available or 'none'}")
    return load_checkpoint(storage, name, state, strict=strict, rng=rng)



