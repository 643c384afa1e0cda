"""What a source contributes to an import: state entries (with the kind each restores as), clues to
the step, and where each came from.  Shared by every format reader."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ...state.objects import Kind

__all__ = ["Entry", "Found", "StepClue", "TRAINER_STATE", "infer_kind", "is_state_dict", "is_optimizer_state",
           "step_in_name", "numbered_entries"]

# The entry that keeps a format's plain training-loop values (epoch, counters, its own bookkeeping).
TRAINER_STATE = "trainer_state"

# Names that say "step N" in a file or directory name: step_100, step-100, step=100, iter_100,
# checkpoint-100, ckpt_100.  A bare number is not a step: MiniMind's pretrain_512.pth names a width.
_STEP_IN_NAME = re.compile(r"(?:^|[_\-.=])(?:step|iter|iteration|checkpoint|ckpt)[_\-=]?(\d+)(?=$|[_\-.])")


@dataclass
class Entry:
    """One state entry to write: restored into an object of ``kind`` (module, optimizer, ...)."""

    kind: Kind
    value: Any
    source: str


@dataclass
class StepClue:
    step: int
    where: str  # e.g. "trainer_state.json global_step", for messages


@dataclass
class Found:
    """What one source (a file or a directory) contributes."""

    format: str
    files: list[str]
    entries: dict[str, Entry] = field(default_factory=dict)
    steps: list[StepClue] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # why a step the source seems to hold was not taken
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def is_state_dict(value: Any) -> bool:
    """A module's ``state_dict()``: str keys, tensor values (a module's ``_extra_state`` may be anything)."""
    return (isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value)
            and all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in value.items())
            and any(isinstance(v, torch.Tensor) for v in value.values()))


def is_optimizer_state(value: Any) -> bool:
    """An ``optimizer.state_dict()``: ``state`` (a dict) and ``param_groups`` (dicts with ``params``)."""
    if not isinstance(value, dict) or not isinstance(value.get("state"), dict):
        return False
    groups = value.get("param_groups")
    return isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                            for g in groups)


def infer_kind(name: str, value: Any) -> Kind:
    """The kind of object a saved value restores into, from its layout (and, for dicts that could be
    anything, its name): restore() refuses an entry whose kind differs from the live object's."""
    if is_state_dict(value):
        return Kind.MODULE
    if is_optimizer_state(value):
        return Kind.OPTIMIZER
    if isinstance(value, dict) and name.lower().endswith(("scaler", "scheduler")):
        return Kind.STATEFUL
    return Kind.VALUE


def step_in_name(name: str) -> int | None:
    match = _STEP_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def numbered_entries(base: str, values: list[Any], kind: Kind, source: str) -> dict[str, Entry]:
    """``base``, ``base_1``, ``base_2``, ...: a framework's list of optimizers or schedulers."""
    return {base if i == 0 else f"{base}_{i}": Entry(kind, value, source) for i, value in enumerate(values)}
