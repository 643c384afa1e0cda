"""Readers of foreign checkpoint layouts, one module per family: ``single_file`` (a state_dict, a
training dict such as MiniMind's, a Lightning ``.ckpt``), ``consistency`` (openai/consistency_models'
per-step files), ``huggingface`` (a Trainer ``checkpoint-N/``).  Each turns a source into a
:class:`~.base.Found`: state entries with the kind of object each restores into, and clues to the step.
Every file is read weights-only (``files``)."""

from __future__ import annotations

import os

from ...errors import CheckpointNotFoundError
from .base import Entry, Found, StepClue
from .consistency import family_member, family_steps, read_family
from .huggingface import is_trainer_checkpoint, read_trainer_checkpoint
from .single_file import read_file

__all__ = ["Entry", "Found", "StepClue", "read_source"]


def read_source(path: str, step: int | None) -> Found:
    """What the file or directory ``path`` holds.  ``step`` picks one step of a directory of the
    consistency-models family that holds several."""
    if os.path.isdir(path):
        return _read_directory(path, step)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory to import")
    if family_member(os.path.basename(path)) is not None:
        return read_family([path])
    return read_file(path)


def _read_directory(path: str, step: int | None) -> Found:
    if is_trainer_checkpoint(path):
        return read_trainer_checkpoint(path)
    steps = family_steps(path)
    if not steps:
        raise ValueError(f"{path}: no checkpoint found in this directory. unbroken import reads a Hugging Face "
                         "Trainer checkpoint-N directory (trainer_state.json, model.safetensors, ...), or the "
                         "consistency-models files (model/ema_<rate>/opt/target_model<step>.pt); pass other "
                         "files (.pt, .pth, .bin, .ckpt, .safetensors) by name")
    if step is not None:
        if step not in steps:
            raise ValueError(f"{path} holds the consistency-models files of steps {sorted(steps)}, not of step "
                             f"{step}. Fix: pass --step with one of them")
        return read_family(steps[step])
    if len(steps) > 1:
        raise ValueError(f"{path} holds the consistency-models files of steps {sorted(steps)}; an import makes "
                         "one checkpoint. Fix: pass --step N to choose one (or the files of one step)")
    return read_family(next(iter(steps.values())))
