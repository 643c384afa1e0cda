"""Optimizer state restored by copying saved bytes into the optimizer's own tensors.

``Optimizer.load_state_dict`` searches every param group's list for each state tensor it casts
(``_process_value_according_to_param_policy``: quadratic in the number of parameters, half of a
64k-tensor restore) and keeps a fresh copy of every state tensor.  For the optimizers torch ships
whose loading we know exactly, :func:`load_optimizer_in_place` builds the same ``state`` and
``param_groups`` in linear time, reusing each live state tensor that already has the saved shape,
dtype and device (so the saved bytes go straight from the mapped file into it), and then calls the
optimizer's own ``__setstate__`` as torch does (defaults of newer torch versions, AdamW's
``decoupled_weight_decay``, the step profiling patch).  Anything unusual returns False and takes
torch's path: other classes or subclasses, load hooks, sparse or tensor-subclass parameters
(DTensor), state values that are not tensors or numbers, param ids not numbered as ``state_dict``
numbers them.
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from typing import Any

import torch

__all__ = ["load_optimizer_in_place", "to_live_devices"]

# Exact classes only: a subclass may override load_state_dict, __setstate__ or what its state means.
_KNOWN: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)
_PARAM_TYPES = (torch.Tensor, torch.nn.Parameter)
_NUMBERS = (int, float, bool, type(None))


def to_live_devices(saved: Any, current: Any) -> Any:
    """Tensors go to the device of the live tensor at the same place (saved on GPU, resumed on CPU, ...)."""
    if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor):
        return saved.to(current.device) if saved.device != current.device else saved
    if isinstance(saved, dict) and isinstance(current, dict):
        return {k: to_live_devices(v, current.get(k)) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current):
        return type(saved)(to_live_devices(s, c) for s, c in zip(saved, current, strict=True))
    return saved


def load_optimizer_in_place(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> bool:
    """Load ``saved`` (an optimizer state dict whose tensors may be views of a mapped file, read only
    during this call) into ``optimizer`` with exactly the result of ``to_live_devices`` followed by
    ``optimizer.load_state_dict`` on owned copies.  False, with nothing changed, when not eligible."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not _eligible(optimizer, saved, params):
        return False
    saved_groups: list[dict[str, Any]] = saved["param_groups"]
    on_device = to_live_devices(saved_groups, [dict(group) for group in optimizer.param_groups])
    new_groups = deepcopy(on_device)  # one memo over all groups, as torch's deepcopy of the list
    # Where torch's policy looks up fused/capturable: the first saved group listing the param id.
    to_param_device: list[bool] = []
    for group in on_device:
        flag = bool(group.get("fused", False) or group.get("capturable", False))
        to_param_device += [flag] * len(group["params"])
    seen = {p.untyped_storage().data_ptr() for p in params}
    state: defaultdict[torch.Tensor, dict[Any, Any]] = defaultdict(dict)
    for param_id, per_param in saved["state"].items():
        param = params[param_id]
        live = optimizer.state.get(param)
        live = live if isinstance(live, dict) else {}
        state[param] = {key: _place(value, live.get(key), param, key, to_param_device[param_id], seen)
                        if isinstance(value, torch.Tensor) else value
                        for key, value in per_param.items()}
    for group, new_group in zip(optimizer.param_groups, new_groups, strict=True):
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in new_group:
            new_group["param_names"] = group["param_names"]
    optimizer.__setstate__({"state": state, "param_groups": new_groups})
    return True


def _eligible(optimizer: torch.optim.Optimizer, saved: dict[str, Any], params: list[torch.Tensor]) -> bool:
    if (type(optimizer) not in _KNOWN or optimizer._optimizer_load_state_dict_pre_hooks
            or optimizer._optimizer_load_state_dict_post_hooks or set(saved) != {"state", "param_groups"}):
        return False
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return False  # torch raises its own error for this
    if [p for g in groups for p in g["params"]] != list(range(len(params))):
        return False
    if not all(type(p) in _PARAM_TYPES and p.layout is torch.strided for p in params):
        return False
    for param_id, per_param in saved["state"].items():
        if type(param_id) is not int or not 0 <= param_id < len(params) or not isinstance(per_param, dict):
            return False
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                if type(value) is not torch.Tensor or value.layout is not torch.strided:
                    return False
            elif not isinstance(value, _NUMBERS):
                return False  # torch deep-copies containers in its own way; keep its path for them
    return True


def _place(saved: torch.Tensor, live: Any, param: torch.Tensor, key: Any, to_param_device: bool,
           seen: set[int]) -> torch.Tensor:
    """The tensor torch's path would hold: ``saved`` moved to ``live``'s device, then cast by
    ``Optimizer._process_value_according_to_param_policy``; written into ``live`` when it can hold
    exactly that (and nothing else shares its memory), else into a fresh contiguous tensor."""
    device = live.device if isinstance(live, torch.Tensor) else saved.device
    dtype = saved.dtype
    if key == "step":
        if to_param_device:
            dtype, device = torch.float32, param.device
    else:
        device = param.device
        if param.is_floating_point():
            dtype = param.dtype
    pointer = _reusable(live, saved, dtype, device, seen)
    if pointer is None:  # what torch's path holds: a copy of its own, contiguous like the file's bytes
        return saved.to(dtype=dtype, device=device, copy=True, memory_format=torch.contiguous_format)
    seen.add(pointer)
    live.copy_(saved)
    return live  # type: ignore[no-any-return]


def _reusable(live: Any, saved: torch.Tensor, dtype: torch.dtype, device: torch.device, seen: set[int]) -> int | None:
    """The storage address of ``live`` when it is a plain tensor owning all of its storage, alone,
    with the wanted shape, dtype and device, so that overwriting it changes nothing but its values
    (no view of another tensor, no other state entry or parameter sharing it, no autograd history);
    else None."""
    if (type(live) is not torch.Tensor or live.dtype != dtype or live.shape != saved.shape
            or live.device != device or live.requires_grad or live._base is not None
            or live.storage_offset() or not live.is_contiguous() or live.layout is not torch.strided
            or live.is_inference() or live.is_conj() or live.is_neg()):
        return None
    storage = live.untyped_storage()
    pointer: int = storage.data_ptr()
    return pointer if storage.nbytes() == live.nbytes and pointer not in seen else None
