"""A Hugging Face Trainer ``checkpoint-N/`` directory.

Entries: ``model`` (model.safetensors, its shards, or pytorch_model.bin), ``optimizer`` (optimizer.pt),
``scheduler`` (scheduler.pt), ``scaler`` (scaler.pt, with fp16), ``trainer_state`` (trainer_state.json
as plain values), and the RNG streams of rng_state.pth as the run's own (restore() sets them, as the
Trainer does on resume).  The step is trainer_state.json's ``global_step``.  Left out: training_args.bin
(a TrainingArguments object: it needs full unpickling, and is the command line, not training state),
the per-process rng_state_<rank>.pth of a multi-process run, and the model's definition (config.json,
tokenizer files), which the code that builds the model already has.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..._internal.warn import warn
from ...state.capture import RNG_KEY
from ...state.objects import Kind
from .base import TRAINER_STATE, Entry, Found, StepClue, is_optimizer_state, is_state_dict, step_in_name
from .files import load_safetensors, load_torch_file, numpy_arrays_allowed

__all__ = ["is_trainer_checkpoint", "read_trainer_checkpoint"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_MARKERS = ("trainer_state.json", *_WEIGHTS)
_OBJECT_FILES = (("optimizer.pt", "optimizer", Kind.OPTIMIZER), ("scheduler.pt", "scheduler", Kind.STATEFUL),
                 ("scaler.pt", "scaler", Kind.STATEFUL))


def is_trainer_checkpoint(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in _MARKERS)


def read_trainer_checkpoint(directory: str) -> Found:
    found = Found("huggingface_trainer", [])
    model = _model_state(directory, found)
    if model is not None:
        found.entries["model"] = Entry(Kind.MODULE, model, directory)
    for name, entry, kind in _OBJECT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            value = load_torch_file(path)
            if kind is Kind.OPTIMIZER and not is_optimizer_state(value):
                raise ValueError(f"{path} does not hold an optimizer state_dict (no 'state' and 'param_groups')")
            found.entries[entry] = Entry(kind, value, path)
            found.files.append(path)
    _trainer_state(directory, found)
    _rng_state(directory, found)
    left_out = sorted(n for n in os.listdir(directory) if n == "training_args.bin" or
                      (n.startswith("rng_state_") and n.endswith(".pth")))
    found.notes += [f"{n}: not imported (see docs/IMPORT.md)" for n in left_out]
    named = step_in_name(os.path.basename(os.path.normpath(directory)))
    if named is not None:
        found.steps.append(StepClue(named, f"the name {os.path.basename(os.path.normpath(directory))}"))
    if not found.entries:
        raise ValueError(f"{directory}: a Trainer checkpoint directory without model weights, optimizer.pt or "
                         "trainer_state.json; nothing to import")
    return found


def _model_state(directory: str, found: Found) -> dict[str, Any] | None:
    for name in _WEIGHTS:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
            paths = [os.path.join(directory, os.path.basename(str(s))) for s in shards]
        else:
            paths = [path]
        state: dict[str, Any] = {}
        for part in paths:
            state.update(load_safetensors(part) if part.endswith(".safetensors") else load_torch_file(part))
            found.files.append(part)
        if not is_state_dict(state):
            raise ValueError(f"{path}: does not hold a model's state_dict")
        _add_tied_weights(directory, state, found)
        return state
    return None


def _add_tied_weights(directory: str, state: dict[str, Any], found: Found) -> None:
    """The Trainer saves one tensor of each tied pair (GPT-2's lm_head.weight is its token embedding):
    the model's state_dict() has both names, and restore() matches names exactly, so the other name is
    added back, as the same tensor.  Which names are tied is the model class's declaration, read from
    the transformers package itself (never from code in the checkpoint)."""
    config_path = os.path.join(directory, "config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    if not config.get("tie_word_embeddings", True) or not config.get("architectures"):
        return
    try:
        import transformers
    except ImportError:
        note = (f"{config_path} ties word embeddings, and transformers (which declares which weights are tied) "
                "is not installed: a tied weight the Trainer left out of the file stays out, and restore() will "
                "report it missing. Fix: pip install transformers and import again")
        found.notes.append(note)
        warn(note, UserWarning)
        return
    for architecture in config["architectures"]:
        mapping = getattr(getattr(transformers, str(architecture), None), "_tied_weights_keys", None)
        if not isinstance(mapping, dict):
            continue
        for target, source in mapping.items():
            if target not in state and source in state:  # names, not patterns: those never match exactly
                state[target] = state[source]
                found.notes.append(f"model: {target} restored as the tied weight {source}")


def _trainer_state(directory: str, found: Found) -> None:
    path = os.path.join(directory, "trainer_state.json")
    if not os.path.isfile(path):
        return
    state = _read_json(path)
    found.entries[TRAINER_STATE] = Entry(Kind.VALUE, state, path)
    found.files.append(path)
    step = state.get("global_step")
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        found.steps.append(StepClue(step, "trainer_state.json global_step"))


def _rng_state(directory: str, found: Found) -> None:
    path = os.path.join(directory, "rng_state.pth")
    if not os.path.isfile(path):
        return
    with numpy_arrays_allowed():
        saved = load_torch_file(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not the Trainer's RNG states (a dict with 'python', 'numpy', 'cpu')")
    streams: dict[str, Any] = {}
    for theirs, ours in (("python", "python"), ("numpy", "numpy"), ("cpu", "torch")):
        if theirs in saved:
            streams[ours] = saved[theirs]
    if "cuda" in saved:  # one device's state, or every device's (a list) in a distributed run
        cuda = saved["cuda"]
        streams["cuda"] = list(cuda) if isinstance(cuda, (list, tuple)) else [cuda]
    found.entries[RNG_KEY] = Entry(Kind.RNG, streams, path)
    found.files.append(path)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value
