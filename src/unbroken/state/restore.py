"""A saved state tree → the live training objects.

Everything is decoded and checked before anything is loaded, so a mismatch leaves the live objects
untouched and is reported in one error listing every problem.  RNG streams are restored last, after
any ``load_state_dict`` that might draw random numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._internal.warn import warn
from ..errors import CorruptCheckpointError, PartialRestoreError, StateMismatchError
from ..format.values import Json, decode
from .capture import RNG_KEY, check_state_keys
from .inplace import load_optimizer_in_place, to_live_devices
from .objects import Kind, classify, unwrap_module
from .rng import restore_rng, validate_rng

__all__ = ["restore_state", "copied_on_load"]


@dataclass
class _Entry:
    kind: Kind
    value: Any
    meta: Any = None
    node: Json = None  # the saved tree, decoded again into owned tensors when torch's path keeps them
    skip: set[str] | None = None  # module keys left out under strict=False
    stale: set[Any] = field(default_factory=set)  # optimizer param ids whose state is left out


def restore_state(live: MutableMapping[str, Any], saved: dict[str, Json], tensors: dict[str, torch.Tensor],
                  strict: bool = True, rng: bool = True, views: bool = False) -> None:
    """Load ``saved`` (whose tensors are ``tensors``) into ``live``.

    ``views``: the tensors are views of a mapped file, valid only during this call.  Modules and the
    optimizers :func:`load_optimizer_in_place` knows copy from them into their own tensors; every
    other object gets a copy of each tensor it is handed (made once per tensor name), since it may
    keep it."""
    check_state_keys(live)
    sources = _Sources(tensors, views)
    entries = {key: _decode_entry(key, node, sources) for key, node in saved.items()}
    rng_entry = entries.pop(RNG_KEY, None)
    if rng and rng_entry is not None:
        validate_rng(rng_entry.value)
    for key, entry in entries.items():
        _check_shape_of_saved(key, entry)
    problems = _find_problems(live, entries)
    if problems and strict:
        raise StateMismatchError(
            "the checkpoint does not match the live training state:\n  - " + "\n  - ".join(problems)
            + "\nFix: build the same model/optimizer as when the checkpoint was saved, or pass strict=False "
            "to load only what matches.")
    if problems:
        warn("loading with strict=False; skipped:\n  - " + "\n  - ".join(problems), UserWarning)
    done: list[str] = []
    for key, entry in entries.items():
        if key in live and entry.kind is classify(live[key]) and entry.skip != {"*"}:
            try:
                live[key] = _apply(live[key], entry, sources)
            except Exception as exc:  # whatever an object's load_state_dict raises
                raise PartialRestoreError(
                    f"state entry {key!r} could not be loaded ({type(exc).__name__}: {exc}); "
                    f"already overwritten: {done or 'nothing'}") from exc
            done.append(key)
    if rng and rng_entry is not None:
        restore_rng(rng_entry.value)


def copied_on_load(saved: dict[str, Json]) -> set[str]:
    """Names of tensors that loading only copies from (module parameters and buffers): they can be
    handed over as views of a mapped file.  Everything else may be kept by the object it is loaded
    into (optimizer state, user objects), so it must own its memory."""
    names: set[str] = set()

    def walk(node: Json) -> None:
        if isinstance(node, dict):
            if len(node) == 1 and isinstance(node.get("__tensor__"), str):
                names.add(node["__tensor__"])  # type: ignore[arg-type]
            else:
                for value in node.values():
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for node in saved.values():
        if isinstance(node, dict) and node.get("kind") == Kind.MODULE.value:
            walk(node.get("value"))
    return names


class _Sources:
    """The checkpoint's tensors, as given (``view``) or owned by the caller (``owned``: a copy of a
    mapped view, made at most once per name so that values sharing a tensor keep sharing it)."""

    def __init__(self, tensors: dict[str, torch.Tensor], views: bool) -> None:
        self.tensors = tensors
        self.views = views
        self.copies: dict[str, torch.Tensor] = {}

    def getter(self, key: str, owned: bool) -> Callable[[str], torch.Tensor]:
        def get_tensor(name: str) -> torch.Tensor:
            if name not in self.tensors:
                raise CorruptCheckpointError(
                    f"state entry {key!r} refers to tensor {name!r}, which is not in the checkpoint")
            if not (owned and self.views):
                return self.tensors[name]
            if name not in self.copies:
                self.copies[name] = self.tensors[name].clone()
            return self.copies[name]

        return get_tensor


def _decode_entry(key: str, node: Json, sources: _Sources) -> _Entry:
    if not isinstance(node, dict) or "value" not in node:
        raise CorruptCheckpointError(f"state entry {key!r} is malformed")
    try:
        kind = Kind(node.get("kind"))
    except ValueError:
        raise CorruptCheckpointError(f"state entry {key!r} has unknown kind {node.get('kind')!r}") from None
    # Modules only copy from what they are given; an optimizer is decoded again if it takes torch's path.
    get_tensor = sources.getter(key, owned=kind not in (Kind.MODULE, Kind.OPTIMIZER))
    return _Entry(kind, decode(node["value"], get_tensor), decode(node.get("meta"), get_tensor), node=node)


def _check_shape_of_saved(key: str, entry: _Entry) -> None:
    """A crafted or foreign tree must fail here, before anything is loaded."""
    value = entry.value
    if entry.kind is Kind.MODULE:
        if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise CorruptCheckpointError(f"state entry {key!r}: a module's state must be a dict with str keys")
        if not _is_module_meta(entry.meta):
            raise CorruptCheckpointError(
                f"state entry {key!r}: module metadata must map submodule names to {{'version': int}}")
    elif entry.kind is Kind.OPTIMIZER:
        groups = value.get("param_groups") if isinstance(value, dict) else None
        if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                 for g in groups) and isinstance(value.get("state"), dict)):
            raise CorruptCheckpointError(
                f"state entry {key!r}: an optimizer's state must be a dict with 'state' (dict) and "
                "'param_groups' (list of dicts with 'params')")
        problem = _optimizer_tree_problem(value)
        if problem:
            raise CorruptCheckpointError(f"state entry {key!r}: {problem}")


def _is_module_meta(meta: Any) -> bool:
    if meta is None:
        return True
    return isinstance(meta, dict) and all(
        isinstance(name, str) and isinstance(info, dict)
        and all(isinstance(k, str) for k in info)
        and (not isinstance(info.get("version"), bool) and isinstance(info.get("version", 0), (int, type(None))))
        for name, info in meta.items())


def _optimizer_tree_problem(value: dict[str, Any]) -> str | None:
    ids = [p for g in value["param_groups"] for p in g["params"]]
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in ids):
        return "optimizer param ids must be integers"
    for param_id, per_param in value["state"].items():
        if not isinstance(per_param, dict):
            return f"optimizer state of param {param_id!r} must be a dict"
        step = per_param.get("step", 0)
        if not isinstance(step, (torch.Tensor, int, float)) or isinstance(step, bool):
            return f"optimizer 'step' of param {param_id!r} must be a tensor or a number"
    return None


def _find_problems(live: MutableMapping[str, Any], entries: dict[str, _Entry]) -> list[str]:
    problems = [f"{key!r}: in the live state but not in the checkpoint" for key in live if key not in entries]
    problems += [f"{key!r}: in the checkpoint but not in the live state" for key in entries if key not in live]
    for key, entry in entries.items():
        if key not in live:
            continue
        kind = classify(live[key])
        if kind is not entry.kind:
            problems.append(f"{key!r}: saved as {entry.kind.value}, but the live object is a {kind.value}")
            entry.skip = {"*"}
        elif kind is Kind.MODULE:
            problems += _module_problems(key, unwrap_module(live[key]).state_dict(), entry)
        elif kind is Kind.OPTIMIZER:
            problems += _optimizer_problems(key, live[key], entry)
        elif callable(getattr(live[key], "check_state_dict", None)):  # e.g. a loader's dataset size
            found = [f"{key!r}: {p}" for p in live[key].check_state_dict(entry.value)]
            entry.skip = {"*"} if found else None
            problems += found
    return problems


def _module_problems(key: str, current: dict[str, Any], entry: _Entry) -> list[str]:
    saved: dict[str, Any] = entry.value
    entry.skip = set()
    problems = [f"{key!r}: missing key {k!r}" for k in current if k not in saved]
    problems += [f"{key!r}: unexpected key {k!r}" for k in saved if k not in current]
    for name in saved.keys() & current.keys():
        have, want = saved[name], current[name]
        if isinstance(want, torch.Tensor) and not isinstance(have, torch.Tensor):
            raise CorruptCheckpointError(f"state entry {key!r}: {name!r} is a {type(have).__name__} in the "
                                         "checkpoint, not a tensor")
        if not isinstance(have, torch.Tensor):
            continue
        if have.shape != want.shape:
            problems.append(f"{key!r}: {name!r} has shape {list(have.shape)} in the checkpoint but "
                            f"{list(want.shape)} in the model")
            entry.skip.add(name)
        elif have.dtype != want.dtype:
            problems.append(f"{key!r}: {name!r} is {have.dtype} in the checkpoint but {want.dtype} in the model "
                            "(strict=False casts it)")
    return problems


def _optimizer_problems(key: str, live: torch.optim.Optimizer, entry: _Entry) -> list[str]:
    have = [len(g["params"]) for g in entry.value["param_groups"]]
    want = [len(g["params"]) for g in live.param_groups]
    if have != want:
        entry.skip = {"*"}
        return [f"{key!r}: the checkpoint has param groups of sizes {have} but the optimizer has {want}"]
    problems = []
    for index, (param_id, param) in enumerate(_saved_ids_to_params(entry.value, live)):
        per_param = entry.value["state"].get(param_id)
        problem = _unfitting_state(per_param, param, live) if isinstance(per_param, dict) else None
        if problem:
            problems.append(f"{key!r}: optimizer state of param {index} has {problem} (strict=False starts this "
                            "parameter's optimizer state afresh, 'step' included)")
            entry.stale.add(param_id)
    return problems


def _saved_ids_to_params(saved: dict[str, Any], live: torch.optim.Optimizer) -> Iterator[tuple[Any, torch.Tensor]]:
    """Saved param id -> live parameter, by position, as ``Optimizer.load_state_dict`` matches them."""
    ids = (param_id for group in saved["param_groups"] for param_id in group["params"])
    params = (param for group in live.param_groups for param in group["params"])
    return zip(ids, params, strict=True)


def _unfitting_state(per_param: dict[str, Any], param: torch.Tensor, live: torch.optim.Optimizer) -> str | None:
    """What in one parameter's saved optimizer state cannot be used with the live parameter, or None.

    Scalars ('step', Adam's capturable 'step', ASGD's 'eta') fit any shape.  The other tensors fit
    when one of them has the parameter's shape (per-element state: moments, momentum; a quantised
    optimizer's codebook beside it is its own business), when together they broadcast to exactly that
    shape (factored state: Adafactor's row_var [n, 1] and col_var [1, m]), or when all are flat over
    every parameter of the optimizer (LBFGS keeps its state in the first parameter's slot).
    Dtypes are not compared: ``Optimizer.load_state_dict`` casts floating state to the parameter's.
    """
    shaped = {name: value for name, value in per_param.items()
              if isinstance(value, torch.Tensor) and value.dim() > 0}
    shapes = [value.shape for value in shaped.values()]
    if not shaped or param.shape in shapes:
        return None
    try:
        if torch.broadcast_shapes(*shapes) == param.shape:  # type: ignore[no-untyped-call]  # unannotated in torch
            return None
    except (RuntimeError, ValueError):
        pass  # shapes that do not broadcast together
    flat = sum(p.numel() for group in live.param_groups for p in group["params"])
    if all(shape == (flat,) for shape in shapes):
        return None
    names = [name for name, value in shaped.items() if value.shape == shapes[0]]
    return (f"{', '.join(map(repr, names))} of shape {list(shapes[0])} but the parameter has shape "
            f"{list(param.shape)}")


def _apply(target: Any, entry: _Entry, sources: _Sources) -> Any:
    if entry.kind is Kind.MODULE:
        values = OrderedDict((k, v) for k, v in entry.value.items() if k not in (entry.skip or set()))
        module = unwrap_module(target)
        if _plain_tensors_only(module):
            _copy_into(module, values)
        else:
            values._metadata = entry.meta or {}  # type: ignore[attr-defined]
            module.load_state_dict(values, strict=not entry.skip and _no_missing(target, values))
        return target
    if entry.kind is Kind.OPTIMIZER:
        _load_optimizer(target, entry, sources)
        return target
    if entry.kind is Kind.STATEFUL:
        _load_stateful(target, entry.value)
        return target
    # Plain values are replaced in the state dict, never mutated in place: an ``args`` namespace or
    # config dict the user also holds keeps what the command line said, and ``state[key]`` holds
    # what the checkpoint said.
    return entry.value


def _load_optimizer(target: torch.optim.Optimizer, entry: _Entry, sources: _Sources) -> None:
    # A parameter's state goes whole or not at all: torch's optimizers initialise a parameter's
    # state only when it is empty (a 'step' kept without its moments fails with a KeyError), and
    # Adam's bias correction must count the steps the fresh moments have seen, not the old ones.
    def without_stale(value: dict[str, Any]) -> dict[str, Any]:
        if not entry.stale:
            return value
        return {**value, "state": {k: v for k, v in value["state"].items() if k not in entry.stale}}

    if load_optimizer_in_place(target, without_stale(entry.value)):
        return
    value = entry.value
    if sources.views:  # torch's path keeps the tensors it is given
        value = decode(entry.node["value"], sources.getter("", owned=True))  # type: ignore[index,call-overload]
    _load_stateful(target, without_stale(value))


def _plain_tensors_only(module: nn.Module) -> bool:
    """True when no submodule customises loading (hooks, _load_from_state_dict, extra state): then
    loading is exactly ``param.copy_(saved)`` for each entry, which is what we do directly.

    ``nn.Module.load_state_dict`` filters the whole state dict once per submodule, quadratic in the
    number of submodules: 2,000 layers take seconds.  Modules that customise loading keep it.
    """
    base = nn.Module
    for m in module.modules():
        kind = type(m)
        if (kind._load_from_state_dict is not base._load_from_state_dict
                or kind.get_extra_state is not base.get_extra_state
                or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks):
            return False
    return True


def _copy_into(module: nn.Module, values: dict[str, Any]) -> None:
    live = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in values.items():
            if live[name] is not value:
                live[name].copy_(value)


def _no_missing(target: Any, values: dict[str, Any]) -> bool:
    return set(unwrap_module(target).state_dict()) == set(values)


def _load_stateful(target: Any, value: Any) -> None:
    if value == {} and target.state_dict() == {}:
        return  # nothing was saved and nothing is expected (e.g. a disabled GradScaler refuses {})
    if isinstance(value, dict):
        value = to_live_devices(value, target.state_dict())
    target.load_state_dict(value)

