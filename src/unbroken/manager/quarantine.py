"""Moving a checkpoint found corrupt out of the way, so that it never costs a good one.

A corrupt ``step_N`` left in place would be counted by retention as if it were valid (and could
push the only good checkpoint out), and would block saving step N again when the resumed run gets
there.  Quarantined, it is renamed ``corrupt-step_N-<UTC time>-<id>``: kept for inspection, listed
by ``unbroken ls``, never restored or counted, removed by ``unbroken prune --invalid``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .._internal.warn import warn
from ..errors import CorruptCheckpointError, UnbrokenError
from ..storage import Storage, parse_step_name
from ..storage.base import quarantine_name
from .events import EventLog
from .mirror import Mirror

__all__ = ["quarantine", "repair_from"]

log = logging.getLogger("unbroken")


def quarantine(storage: Storage, name: str, problem: CorruptCheckpointError,
               clock: Callable[[], float] = time.time, events: EventLog | None = None) -> str | None:
    """Move checkpoint ``name`` to a quarantine name; that name, or None (with a warning) when it
    could not be moved, in which case it stays where it was and is skipped again next time.
    ``events``: the run's event log, told of the move."""
    new_name = quarantine_name(name, clock())
    try:
        storage.quarantine(name, new_name)
    except (OSError, NotImplementedError) as exc:
        message = (f"could not quarantine the corrupt checkpoint {storage.url}/{name} ({exc}); it stays "
                   "in place and is skipped. Fix: move or delete it (unbroken prune --invalid)")
        warn(message, RuntimeWarning)
        return None
    log.warning("quarantined corrupt checkpoint %s/%s as %s (%s)", storage.url, name, new_name, problem)
    if events is not None:
        events.quarantined(name, new_name, problem)
    return new_name


def repair_from(mirror: Mirror | None, name: str) -> bool:
    """Download the mirror's copy of the quarantined checkpoint ``name`` (verified where it lands);
    True when a good copy is now in its place.  A mirror that cannot be reached is a warning: an older
    local checkpoint is still there to resume from."""
    step = parse_step_name(name)
    if mirror is None or step is None:
        return False
    try:
        return mirror.fetch(step) is not None
    except (OSError, UnbrokenError) as exc:
        warn(f"mirror: could not fetch a copy of {name} from {mirror.remote.url}: {exc}", RuntimeWarning)
        return False
