"""One checkpoint file read by what it holds: a plain ``state_dict``, a training dict (MiniMind's
``{'model', 'optimizer', 'scaler', 'epoch', 'step', 'args'}``), or a Lightning ``.ckpt``."""

from __future__ import annotations

import os
from typing import Any, TypeGuard

from ...state.objects import Kind
from .base import (
    TRAINER_STATE,
    Entry,
    Found,
    StepClue,
    infer_kind,
    is_optimizer_state,
    is_state_dict,
    numbered_entries,
    step_in_name,
)
from .files import load_safetensors, load_torch_file

__all__ = ["read_file"]

# Keys only a Lightning checkpoint has beside its state_dict.
_LIGHTNING_KEYS = ("pytorch-lightning_version", "optimizer_states", "lr_schedulers", "global_step", "loops")


def read_file(path: str) -> Found:
    name = os.path.basename(path)
    contents = load_safetensors(path) if name.endswith(".safetensors") else load_torch_file(path)
    if is_state_dict(contents):
        found = Found("state_dict", [path], {"model": Entry(Kind.MODULE, contents, path)})
    elif is_optimizer_state(contents):
        found = Found("optimizer", [path], {"optimizer": Entry(Kind.OPTIMIZER, contents, path)})
    elif isinstance(contents, dict) and is_state_dict(contents.get("state_dict")) and any(
            key in contents for key in _LIGHTNING_KEYS):
        found = _lightning(path, contents)
    elif isinstance(contents, dict) and any(is_state_dict(v) or is_optimizer_state(v) for v in contents.values()):
        found = _training_dict(path, contents)
    else:
        raise ValueError(f"{path}: not a layout unbroken import knows ({_describe(contents)}). It reads a "
                         "module's state_dict, a dict holding state_dicts (e.g. {'model': ..., 'optimizer': "
                         "..., 'epoch': ...}), a Lightning .ckpt, a Hugging Face Trainer checkpoint-N "
                         "directory, or the consistency-models files (model/ema_<rate>/opt/target_model<step>"
                         ".pt). Fix: re-save it as one of these")
    if not found.steps:
        named = step_in_name(os.path.splitext(name)[0])
        if named is not None:
            found.steps.append(StepClue(named, f"the name {name}"))
    return found


def _describe(contents: Any) -> str:
    if isinstance(contents, dict):
        keys = [repr(k) for k in list(contents)[:8]]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(contents) > 8 else ''}"
    return f"a {type(contents).__name__}"


def _lightning(path: str, contents: dict[str, Any]) -> Found:
    """``state_dict`` -> model (the LightningModule's own keys, e.g. ``net.weight``), each of
    ``optimizer_states`` -> optimizer, optimizer_1, ..., each of ``lr_schedulers`` -> scheduler, ...;
    everything else (epoch, global_step, loops, callbacks, hyper_parameters, ...) -> trainer_state."""
    found = Found("lightning", [path], {"model": Entry(Kind.MODULE, contents["state_dict"], path)})
    optimizers = list(contents.get("optimizer_states") or [])
    for index, value in enumerate(optimizers):
        if not is_optimizer_state(value):
            raise ValueError(f"{path}: optimizer_states[{index}] is not an optimizer state_dict (no 'state' "
                             "and 'param_groups')")
    found.entries.update(numbered_entries("optimizer", optimizers, Kind.OPTIMIZER, path))
    found.entries.update(numbered_entries("scheduler", list(contents.get("lr_schedulers") or []), Kind.STATEFUL,
                                          path))
    rest = {k: v for k, v in contents.items() if k not in ("state_dict", "optimizer_states", "lr_schedulers")}
    found.entries[TRAINER_STATE] = Entry(Kind.VALUE, rest, path)
    step = contents.get("global_step")
    if _is_count(step):
        found.steps.append(StepClue(step, f"{os.path.basename(path)} global_step"))
    return found


def _training_dict(path: str, contents: dict[str, Any]) -> Found:
    """Each state_dict, optimizer, scaler or scheduler under its own key; the plain values (epoch, step,
    args, ...) together under trainer_state.

    The step is ``global_step``, else ``step`` when the dict says nothing of epochs past the first:
    MiniMind's ``step`` counts batches within its ``epoch``, so with ``epoch > 0`` it is no global step."""
    found = Found("training_dict", [path])
    plain: dict[str, Any] = {}
    for key, value in contents.items():
        kind = infer_kind(str(key), value)
        if kind is Kind.VALUE or not isinstance(key, str):
            plain[key] = value
        else:
            found.entries[key] = Entry(kind, value, path)
    if plain:
        found.entries[TRAINER_STATE] = Entry(Kind.VALUE, plain, path)
    name = os.path.basename(path)
    epoch, step, global_step = contents.get("epoch"), contents.get("step"), contents.get("global_step")
    if _is_count(global_step):
        found.steps.append(StepClue(global_step, f"{name} global_step"))
    elif _is_count(step) and (epoch is None or epoch == 0):
        found.steps.append(StepClue(step, f"{name} step"))
    elif _is_count(step):
        found.hints.append(f"{name} holds epoch={epoch!r}, step={step!r}: a step within an epoch, not the "
                           "number of steps done in all")
    return found


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
