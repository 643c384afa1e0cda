"""Gradients that no optimizer step has consumed yet: a save between gradient-accumulation micro-steps.

A checkpoint holds parameters and optimizer state, never ``.grad``: gradients accumulated over the
micro-steps of an unfinished optimizer step are lost by a save taken between them, and a run resumed
from it applies an optimizer step that is missing part of its batch.

How it is told apart from the common loop that zeroes gradients *before* each backward (whose
``.grad`` is non-zero at every save, and harmless: it was applied and will be zeroed): a process-wide
optimizer step post-hook records, per optimizer, its first parameter holding a gradient, that gradient
tensor and its version counter.  At a save, an optimizer's gradients are pending when that gradient
tensor has since been replaced or modified in place (a backward ran after the optimizer's last step)
and is not all zero (``zero_grad(set_to_none=False)`` leaves zeros).  Gradients are pending when every
optimizer of the manager's state that has stepped holds pending gradients: a GAN's generator backward
writes into the discriminator's ``.grad`` after the discriminator's step, but the generator's own step
consumed its gradients, so no warning.  The optimizers of the state are those registered in it
(unwrapped from Accelerate's and Lightning's wrappers), else those stepping the parameters of its
modules: other optimizers of the process (another run's, a notebook's earlier cell's) do not count.

Cost: the hook touches one parameter per optimizer step (microseconds, whatever the model's size);
the save-time check reads version counters and, only when a gradient changed since its optimizer's
step, reduces that one tensor with ``any()``.  Not seen: optimizers that do not subclass
``torch.optim.Optimizer`` (no hook runs), and a save right after a step that ``GradScaler`` skipped
(inf/NaN gradients) is reported although harmless.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._internal.warn import warn

__all__ = ["GradientCheck", "watch_optimizer_steps", "gradients_pending", "PendingGradientsWarning"]

_Record = tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int]

# optimizer -> (its first parameter with a gradient, that gradient, the gradient's version) at its last step
_LAST_STEP: weakref.WeakKeyDictionary[Any, _Record] = weakref.WeakKeyDictionary()
_INSTALL = threading.Lock()
_installed = False


class PendingGradientsWarning(RuntimeWarning):
    """A checkpoint was saved while parameters held gradients no optimizer step has applied yet."""


class GradientCheck:
    """A manager's save-time check: warns once (the pattern repeats at every save between micro-steps)."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        watch_optimizer_steps()
        self._state = state
        self._warned = False

    def at_save(self, step: int) -> bool:
        """Whether gradients are pending now; warns the first time they are."""
        pending = gradients_pending(self._state)
        if pending and not self._warned:
            self._warned = True
            warn(pending_gradients_message(step), PendingGradientsWarning)
        return pending


def watch_optimizer_steps() -> None:
    """Install the process-wide optimizer step post-hook (once; later calls do nothing)."""
    global _installed
    with _INSTALL:
        if not _installed:
            register_optimizer_step_post_hook(_stepped)
            _installed = True


def _stepped(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is not None:
                try:
                    _LAST_STEP[optimizer] = (weakref.ref(param), weakref.ref(grad), grad._version)
                except TypeError:  # an optimizer that cannot be weakly referenced: not watched
                    pass
                return


def gradients_pending(state: Mapping[str, Any]) -> bool:
    """True when every optimizer of ``state`` that has stepped holds gradients computed after its last
    step (see the module docstring); False when none has stepped."""
    verdicts = [_pending(*record) for record in _records_of(state)]
    known = [v for v in verdicts if v is not None]
    return bool(known) and all(known)


def _records_of(state: Mapping[str, Any]) -> list[_Record]:
    last = list(_LAST_STEP.items())
    registered = {id(inner) for value in state.values() for inner in _unwrapped(value)}
    records = [record for optimizer, record in last if id(optimizer) in registered]
    if records or not last:
        return records
    params = {id(p) for value in state.values() if isinstance(value, torch.nn.Module) for p in value.parameters()}
    return [record for _, record in last if id(record[0]()) in params]


def _unwrapped(value: Any, depth: int = 3) -> list[Any]:
    """``value`` and the optimizers it wraps (``.optimizer``: Accelerate; ``._optimizer``: Lightning)."""
    found = [value]
    for _ in range(depth):
        value = getattr(value, "optimizer", None) or getattr(value, "_optimizer", None)
        if value is None:
            break
        found.append(value)
    return found


def _pending(param_ref: weakref.ref[torch.Tensor], grad_ref: weakref.ref[torch.Tensor], version: int) -> bool | None:
    param = param_ref()
    if param is None:
        return None
    grad = param.grad
    if grad is None:
        return False
    if grad is grad_ref() and grad._version == version:
        return False  # the gradient the optimizer step consumed: zeroed or replaced before the next backward
    return bool(grad.any())


def pending_gradients_message(step: int) -> str:
    return (f"checkpoint for step {step} saved while parameters hold gradients that no optimizer step has applied "
            "yet (a save between gradient-accumulation micro-steps): a checkpoint holds no .grad, so a run "
            "resumed from it applies a step missing part of its batch. Fix: report the step to the manager "
            "(ckpt.step(n)) only after optimizer.step() and optimizer.zero_grad(), once per optimizer step, "
            "not per micro-step. Shown once per manager.")
