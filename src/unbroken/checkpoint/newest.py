"""Finding what to resume from: the newest checkpoint that validates, skipping broken ones loudly."""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

from .._internal.warn import warn
from ..errors import (
    CheckpointNotFoundError,
    CheckpointSkippedWarning,
    CorruptCheckpointError,
    PartialRestoreError,
    StateMismatchError,
    UnbrokenError,
    is_damage,
)
from ..format import Manifest
from ..storage import Storage, step_name
from ..storage.paths import committed_steps
from .single import load_checkpoint

__all__ = ["restore_newest", "restore_step", "OnCorrupt"]

log = logging.getLogger("unbroken")


# Decides what happens to a checkpoint found corrupt while resuming: True when a good copy was put
# in its place (try it again), False to go on with the previous one.  The manager quarantines it.
OnCorrupt = Callable[[str, CorruptCheckpointError], bool]


def restore_newest(storage: Storage, state: MutableMapping[str, Any], strict: bool, rng: bool,
                   on_corrupt: OnCorrupt | None = None, only: bool = False,
                   on_skip: Callable[[str, Exception], object] | None = None) -> Manifest | None:
    """Restore the newest valid checkpoint; ``None`` when there is none.

    Any failure to read a checkpoint skips it with a :class:`CheckpointSkippedWarning` and tries the
    previous one: corruption (handed to ``on_corrupt``), a checkpoint that vanished, and anything else
    (an I/O error, a failed allocation).  A checkpoint that does not fit the live objects raises,
    because an older one would not fit either.  Unless every failure was corruption, failing to
    restore any checkpoint raises the first error instead of returning None: a run must never start
    from step 0 because its checkpoints could not be read just now.  ``on_skip(name, error)`` is told
    of each skipped checkpoint (the run's event log).
    """
    partial: PartialRestoreError | None = None
    unreadable: Exception | None = None
    for step in reversed(committed_steps(storage)):
        name = step_name(step)
        for attempt in range(2):  # a corrupt checkpoint replaced by on_corrupt is tried once more
            try:
                return load_checkpoint(storage, name, state, strict=strict, rng=rng, only=only)
            except StateMismatchError:
                raise
            except CorruptCheckpointError as exc:
                if isinstance(exc, PartialRestoreError):
                    partial = exc  # an older checkpoint overwrites every entry again; a fresh start would not
                _skipped(storage, name, exc, on_skip)
                if not is_damage(exc) or on_corrupt is None or not on_corrupt(name, exc):
                    break
                if attempt == 0:
                    log.info("retrying %s/%s with the copy put in its place", storage.url, name)
            except CheckpointNotFoundError as exc:  # deleted since the listing (another process's retention)
                _skipped(storage, name, exc, on_skip)
                break
            except Exception as exc:  # any other failure to read this one (I/O, allocation): try the previous
                unreadable = unreadable or exc
                _skipped(storage, name, exc, on_skip)
                break
    if partial is not None:
        raise partial
    if unreadable is not None:
        raise unreadable
    return None


def _skipped(storage: Storage, name: str, exc: Exception, on_skip: Callable[[str, Exception], object] | None) -> None:
    detail = str(exc) if isinstance(exc, UnbrokenError) else f"{type(exc).__name__}: {exc}"
    if on_skip is not None:
        on_skip(name, exc)
    warn(f"skipping checkpoint {storage.url}/{name}: {detail}", CheckpointSkippedWarning)


def restore_step(storage: Storage, step: int, state: MutableMapping[str, Any], strict: bool, rng: bool) -> Manifest:
    """Restore exactly ``step``; a clear error (never a silent fallback) if it is missing or broken."""
    name = step_name(step)
    if not storage.exists(name):
        available = committed_steps(storage)
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {storage.url}; available steps: "
                                      f"{available or 'none'}")
    return load_checkpoint(storage, name, state, strict=strict, rng=rng)



