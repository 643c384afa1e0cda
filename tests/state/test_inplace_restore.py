"""Restoring in place gives exactly what torch's ``load_state_dict`` path gives, without a copy.

The optimizers torch ships are restored by copying the saved bytes into their own state tensors
(torch's ``Optimizer.load_state_dict`` is quadratic in the number of parameters and keeps a copy of
every tensor).  Every test compares against torch's path on the same checkpoint: optimizer and model
state dicts, param groups, the optimizer's other attributes, and the parameters after a few more
training steps, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import unbroken
import unbroken.state.restore as restore_module
from tests.helpers import assert_exactly_equal
from unbroken.state.inplace import load_optimizer_in_place

Factory = Callable[[nn.Module], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.8, 0.95)),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1),
    "adamw_amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, amsgrad=True),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=1e-2, lr_decay=1e-3),
}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int,
           sched: Any = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 4, generator=gen)).square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _objects(kind: str, seed: int, steps: int, scheduler: bool) -> dict[str, Any]:
    model = _model(seed)
    opt = OPTIMIZERS[kind](model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    _train(model, opt, steps, seed, sched)
    state: dict[str, Any] = {"model": model, "optimizer": opt}
    if sched is not None:
        state["scheduler"] = sched
    return state


def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restore_module, "load_optimizer_in_place", lambda *_: False)


def _assert_same(fast: dict[str, Any], slow: dict[str, Any]) -> None:
    a, b = fast["optimizer"], slow["optimizer"]
    assert_exactly_equal(a.state_dict(), b.state_dict())
    assert_exactly_equal(fast["model"].state_dict(), slow["model"].state_dict())
    assert_exactly_equal(a.param_groups, b.param_groups)
    assert_exactly_equal(a.defaults, b.defaults)
    assert type(a.state) is type(b.state)
    assert sorted(vars(a)) == sorted(vars(b))
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
        assert list(a.state[p]) == list(b.state[q])
        for key, value in a.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.is_contiguous() and value.stride() == b.state[q][key].stride()


@pytest.mark.parametrize("scheduler", [False, True], ids=["plain", "scheduler"])
@pytest.mark.parametrize("live_steps", [0, 2], ids=["fresh", "stepped"])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_in_place_restore_equals_torch_load_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        kind: str, live_steps: int, scheduler: bool) -> None:
    unbroken.save(tmp_path / "ckpt", _objects(kind, seed=1, steps=3, scheduler=scheduler), step=3)
    fast = _objects(kind, seed=2, steps=live_steps, scheduler=scheduler)
    slow = _objects(kind, seed=2, steps=live_steps, scheduler=scheduler)
    unbroken.load(tmp_path / "ckpt", fast)
    with monkeypatch.context() as patch:
        _torch_path(patch)
        unbroken.load(tmp_path / "ckpt", slow)
    _assert_same(fast, slow)
    _train(fast["model"], fast["optimizer"], 3, seed=9, sched=fast.get("scheduler"))
    _train(slow["model"], slow["optimizer"], 3, seed=9, sched=slow.get("scheduler"))
    _assert_same(fast, slow)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_restore_writes_into_the_live_optimizer_state(tmp_path: Path, kind: str) -> None:
    """No second copy of the optimizer state: its tensors are overwritten, not replaced."""
    unbroken.save(tmp_path / "ckpt", _objects(kind, seed=1, steps=3, scheduler=False))
    live = _objects(kind, seed=2, steps=1, scheduler=False)
    before = {(id(p), k): v for p, s in live["optimizer"].state.items() for k, v in s.items()
              if isinstance(v, torch.Tensor)}
    unbroken.load(tmp_path / "ckpt", live)
    after = {(id(p), k): v for p, s in live["optimizer"].state.items() for k, v in s.items()
             if isinstance(v, torch.Tensor)}
    assert before and before.keys() == after.keys()
    assert all(after[key] is tensor for key, tensor in before.items())


def test_restore_never_takes_torchs_quadratic_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unbroken.save(tmp_path / "ckpt", _objects("adam", seed=1, steps=2, scheduler=False))

    def refuse(*_: Any) -> None:
        raise AssertionError("Optimizer.load_state_dict was called")

    live = _objects("adam", seed=2, steps=0, scheduler=False)
    monkeypatch.setattr(torch.optim.Adam, "load_state_dict", refuse, raising=False)
    unbroken.load(tmp_path / "ckpt", live)
    assert len(live["optimizer"].state) == 6


def _reference(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> torch.optim.Optimizer:
    twin = copy.deepcopy(opt)
    twin.load_state_dict(copy.deepcopy(saved))
    return twin


def _saved_adam(**options: Any) -> tuple[nn.Module, dict[str, Any]]:
    model = _model(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **options)
    _train(model, opt, 2, seed=1)
    return model, opt.state_dict()


def test_state_is_cast_to_the_parameter_dtype_as_torch_casts_it() -> None:
    _, saved = _saved_adam()
    for per_param in saved["state"].values():
        per_param["exp_avg"] = per_param["exp_avg"].double()
        per_param["step"] = per_param["step"].double()  # 'step' keeps its own dtype
    live = torch.optim.Adam(_model(2).parameters(), lr=1.0)
    twin = _reference(live, saved)
    assert load_optimizer_in_place(live, saved)
    assert_exactly_equal(live.state_dict(), twin.state_dict())


def test_capturable_step_becomes_float32_on_the_parameter_device() -> None:
    _, saved = _saved_adam()
    for group in saved["param_groups"]:
        group["capturable"] = True
    for per_param in saved["state"].values():
        per_param["step"] = per_param["step"].double()
    live = torch.optim.Adam(_model(2).parameters(), lr=1.0)
    twin = _reference(live, saved)
    assert load_optimizer_in_place(live, saved)
    assert_exactly_equal(live.state_dict(), twin.state_dict())
    assert all(s["step"].dtype == torch.float32 for s in live.state.values())


def test_shared_or_strided_live_state_is_replaced_not_overwritten() -> None:
    """Two state entries sharing one tensor get two tensors; a strided view keeps its old values."""
    model, saved = _saved_adam()
    live_model = _model(2)
    live = torch.optim.Adam(live_model.parameters(), lr=1.0)
    _train(live_model, live, 1, seed=2)
    first, second = list(live.state.values())[:2]
    first["exp_avg_sq"] = first["exp_avg"]  # shared
    wide = torch.zeros(second["exp_avg"].shape[::-1]).t()
    second["exp_avg"] = wide  # not contiguous
    twin = _reference(live, saved)
    assert load_optimizer_in_place(live, saved)
    assert_exactly_equal(live.state_dict(), twin.state_dict())
    now = live.state[next(iter(live.state))]
    assert now["exp_avg"] is first["exp_avg"] and now["exp_avg_sq"] is not first["exp_avg"]
    assert not wide.any()


def test_unusual_optimizers_take_torchs_path() -> None:
    _, saved = _saved_adam()

    class MyAdam(torch.optim.Adam):
        pass

    subclass = MyAdam(_model(2).parameters())
    assert not load_optimizer_in_place(subclass, saved)
    hooked = torch.optim.Adam(_model(2).parameters())
    hooked.register_load_state_dict_post_hook(lambda _opt: None)
    assert not load_optimizer_in_place(hooked, saved)
    listed = copy.deepcopy(saved)
    listed["state"][0]["extra"] = [1, 2]
    assert not load_optimizer_in_place(torch.optim.Adam(_model(2).parameters()), listed)
    assert not subclass.state and not hooked.state


def test_hooks_registered_on_the_optimizer_still_run(tmp_path: Path) -> None:
    unbroken.save(tmp_path / "ckpt", _objects("adam", seed=1, steps=2, scheduler=False))
    live = _objects("adam", seed=2, steps=0, scheduler=False)
    calls: list[str] = []
    live["optimizer"].register_load_state_dict_pre_hook(lambda _opt, _sd: calls.append("pre"))
    live["optimizer"].register_load_state_dict_post_hook(lambda _opt: calls.append("post"))
    unbroken.load(tmp_path / "ckpt", live)
    assert calls == ["pre", "post"] and len(live["optimizer"].state) == 6


def test_cyclic_gc_is_paused_over_the_whole_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the manifest and mapping the tensors allocate one object per tensor, as decoding does."""
    import gc

    import unbroken.checkpoint.single as single

    unbroken.save(tmp_path / "ckpt", _objects("adam", seed=1, steps=1, scheduler=False))
    seen: list[bool] = []
    read, mapped = single.read_manifest, single.mapped_tensors

    def read_manifest(*args: Any) -> Any:
        seen.append(gc.isenabled())
        return read(*args)

    def mapped_tensors(*args: Any) -> Any:
        seen.append(gc.isenabled())
        return mapped(*args)

    monkeypatch.setattr(single, "read_manifest", read_manifest)
    monkeypatch.setattr(single, "mapped_tensors", mapped_tensors)
    assert gc.isenabled()
    unbroken.load(tmp_path / "ckpt", _objects("adam", seed=2, steps=0, scheduler=False))
    assert seen == [False, False] and gc.isenabled()
