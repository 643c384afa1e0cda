"""The consistency-models file family (openai/consistency_models): one step of training saved as
``model{step:06d}.pt``, ``ema_{rate}_{step:06d}.pt`` (one per EMA rate), ``opt{step:06d}.pt`` and
``target_model{step:06d}.pt`` in one log directory.  They become the entries ``model``,
``ema_<rate>``, ``optimizer`` and ``target_model``."""

from __future__ import annotations

import os
import re

from ...state.objects import Kind
from .base import Entry, Found, StepClue, infer_kind
from .files import load_torch_file

__all__ = ["family_member", "family_steps", "read_family"]

_MEMBER = re.compile(r"^(?:(?P<role>model|opt|target_model)|ema_(?P<rate>.+?)_)(?P<step>\d{6,})\.pt\Z")
_ENTRY = {"model": "model", "opt": "optimizer", "target_model": "target_model"}


def family_member(name: str) -> tuple[str, int] | None:
    """(entry name, step) of a file named like one of the family, else None."""
    match = _MEMBER.match(name)
    if match is None:
        return None
    entry = _ENTRY[match.group("role")] if match.group("role") else f"ema_{match.group('rate')}"
    return entry, int(match.group("step"))


def family_steps(directory: str) -> dict[int, list[str]]:
    """The family's files in ``directory``, by step."""
    steps: dict[int, list[str]] = {}
    for name in sorted(os.listdir(directory)):
        member = family_member(name)
        if member is not None and os.path.isfile(os.path.join(directory, name)):
            steps.setdefault(member[1], []).append(os.path.join(directory, name))
    return steps


def read_family(paths: list[str]) -> Found:
    found = Found("consistency_models", list(paths))
    for path in paths:
        entry, step = family_member(os.path.basename(path)) or ("", 0)
        contents = load_torch_file(path)
        kind = infer_kind(entry, contents)
        want = Kind.OPTIMIZER if entry == "optimizer" else Kind.MODULE
        if kind is not want:
            what = "an optimizer's state_dict" if want is Kind.OPTIMIZER else "a module's state_dict"
            raise ValueError(f"{path}: named like a consistency-models {entry} file but does not hold {what}. "
                             "Fix: rename it, or pass the files that hold the state")
        found.entries[entry] = Entry(kind, contents, path)
        found.steps.append(StepClue(step, f"the name {os.path.basename(path)}"))
    return found
