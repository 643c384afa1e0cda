"""Which checkpoints to keep: small policies that compose by union.

Each policy names the steps it wants kept; a checkpoint survives if any policy keeps it.  The
manager always adds the newest valid checkpoint, so no combination of policies can delete the
checkpoint a restart would resume from.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = ["RetentionPolicy", "KeepLast", "KeepBest", "KeepEvery", "steps_to_keep", "Candidate", "expired",
           "policies_from", "RETENTION_OPTIONS", "BEST_MODES"]


@dataclass(frozen=True)
class Candidate:
    """What a policy may look at: a committed, valid checkpoint."""

    step: int
    metrics: dict[str, Any]


class RetentionPolicy(Protocol):
    def keep(self, candidates: Sequence[Candidate]) -> set[int]: ...


def _positive(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        _positive(self.n, "keep_last")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return {c.step for c in sorted(candidates, key=lambda c: c.step)[-self.n:]}


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``n`` checkpoints with the best ``metric`` (``mode`` "min" or "max").

    Checkpoints without the metric, or with a NaN value, are never "best"; ties go to the newer step.
    """

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        _positive(self.n, "keep_best")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError("keep_best needs best_metric: the name of the metric (passed to step(..., metrics=...)) "
                             "that ranks checkpoints")
        _check_mode(self.mode)

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        scored = [(c.metrics[self.metric], c.step) for c in candidates if _is_score(c.metrics.get(self.metric))]
        sign = 1 if self.mode == "min" else -1
        scored.sort(key=lambda pair: (sign * pair[0], -pair[1]))
        return {step for _, step in scored[: self.n]}


BEST_MODES = ("min", "max")


def _check_mode(mode: str) -> None:
    if mode not in BEST_MODES:
        raise ValueError(f"best_mode must be 'min' or 'max', got {mode!r}")


def _is_score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class KeepEvery:
    """Keep milestones: every checkpoint whose step is a multiple of ``steps``."""

    steps: int

    def __post_init__(self) -> None:
        _positive(self.steps, "keep_every")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return {c.step for c in candidates if c.step % self.steps == 0}


def policies_from(*, keep_last: int | None, keep_best: int | None, best_metric: str | None, best_mode: str,
                  keep_every: int | None) -> list[RetentionPolicy]:
    """The policies these retention options ask for (none: keep everything), or a ValueError naming the
    bad option and its fix.

    The one place retention options become policies: the manager's options, ``unbroken.prune`` and the
    ``unbroken prune`` flags all come here, so they accept and refuse the same settings, with one message.
    """
    _check_mode(best_mode)  # even unused: a typo there is still a mistake
    if best_metric is not None and keep_best is None:
        raise ValueError(f"best_metric={best_metric!r} is set but keep_best is not; set keep_best=N")
    policies: list[RetentionPolicy] = []
    if keep_last is not None:
        policies.append(KeepLast(keep_last))
    if keep_best is not None:
        policies.append(KeepBest(keep_best, best_metric or "", best_mode))
    if keep_every is not None:
        policies.append(KeepEvery(keep_every))
    return policies


# The names of the retention options, in the manager's options and as ``unbroken prune`` flags.
RETENTION_OPTIONS: tuple[str, ...] = tuple(inspect.signature(policies_from).parameters)


def steps_to_keep(candidates: Sequence[Candidate], policies: Iterable[RetentionPolicy]) -> set[int]:
    """Union of what every policy keeps, plus the newest checkpoint.  No policies: keep everything."""
    policies = list(policies)
    if not candidates:
        return set()
    if not policies:
        return {c.step for c in candidates}
    kept = {max(c.step for c in candidates)}
    for policy in policies:
        kept |= policy.keep(candidates)
    return kept


class _Listed(Protocol):
    # Read-only members: frozen dataclasses (CheckpointRecord) satisfy them; settable attributes would not.
    @property
    def step(self) -> int: ...
    @property
    def metrics(self) -> dict[str, Any]: ...
    @property
    def valid(self) -> bool: ...


L = TypeVar("L", bound=_Listed)


def expired(records: Sequence[L], policies: Sequence[RetentionPolicy]) -> list[L]:
    """The valid records that no policy keeps, oldest first (invalid ones are never counted)."""
    valid = [r for r in records if r.valid]
    keep = steps_to_keep([Candidate(r.step, r.metrics) for r in valid], policies)
    return sorted((r for r in valid if r.step not in keep), key=lambda r: r.step)
