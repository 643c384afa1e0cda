"""Save → fresh objects → load gives back exactly what ``state_dict()`` returned, for every supported object."""

from __future__ import annotations

import argparse
import json
import math
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import unbroken
from tests.helpers import (
    SCHEDULERS,
    TensorBag,
    WarmupLambda,
    assert_exactly_equal,
    exactly_equal,
    make_ema,
    make_mlp,
    make_optimizer,
    make_scaler,
    make_scheduler,
    make_training_state,
    snapshot,
    train,
)
from unbroken.errors import StateMismatchError, UnserializableStateError
from unbroken.format import MANIFEST_NAME

# ---------------------------------------------------------------------------------------------
# the comparison helper itself must be strict
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    (1, 1.0), (1, True), ((1, 2), [1, 2]), ({1: "a"}, {"1": "a"}), (0.0, -0.0), (math.nan, 0.0),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}), (torch.zeros(2), torch.zeros(2, dtype=torch.float64)),
    (torch.zeros(2), torch.zeros(1, 2)), (torch.tensor([math.nan]), torch.tensor([1.0])),
    (np.zeros(2, np.float32), np.zeros(2, np.float64)), (np.float32(1), np.float64(1)),
    (argparse.Namespace(a=1), argparse.Namespace(a=2)), ({"a": (1,)}, {"a": (1.0,)}),
])
def test_helper_detects_differences(a: Any, b: Any) -> None:
    assert not exactly_equal(a, b)


def test_helper_accepts_equal_values() -> None:
    value = {0: (math.nan, -0.0, torch.tensor([math.nan, 1.0])), "n": argparse.Namespace(x=np.int64(3))}
    assert exactly_equal(value, {0: (math.nan, -0.0, torch.tensor([math.nan, 1.0])),
                                 "n": argparse.Namespace(x=np.int64(3))})


# ---------------------------------------------------------------------------------------------
# every supported object, one at a time
# ---------------------------------------------------------------------------------------------

def _trained_mlp(seed: int = 0) -> nn.Module:
    model = make_mlp(seed)
    train(model, make_optimizer("adamw", model), seed=seed)
    return model


def _optimizer(kind: str) -> Callable[[bool], Any]:
    def build(trained: bool) -> Any:
        model = make_mlp(0 if trained else 1)
        opt = make_optimizer(kind, model)
        if trained:
            train(model, opt, steps=2)
        return opt
    return build


def _scheduler(kind: str) -> Callable[[bool], Any]:
    def build(trained: bool) -> Any:
        model = make_mlp(0 if trained else 1)
        opt = make_optimizer("adam", model)
        if kind == "lambda" and not trained:  # a fresh multiplier with other settings: load must fix them
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=WarmupLambda(9))
        if trained:
            train(model, opt, steps=2)
        return make_scheduler(kind, opt, steps=3 if trained else 0)
    return build


OBJECTS: dict[str, Callable[[bool], Any]] = {
    "mlp_batchnorm": lambda trained: _trained_mlp(0) if trained else make_mlp(1),
    **{f"optimizer_{k}": _optimizer(k) for k in ("adam", "adamw", "sgd_momentum")},
    **{f"scheduler_{k}": _scheduler(k) for k in SCHEDULERS},
    "grad_scaler": make_scaler,
    "ema": lambda trained: make_ema(_trained_mlp(0), 0.999, updates=2) if trained else make_ema(make_mlp(1)),
    "tensor_bag": lambda trained: TensorBag(0 if trained else 1),
}


def test_every_scheduler_kind_is_covered() -> None:
    assert {"step", "cosine", "onecycle", "lambda", "sequential"} <= set(SCHEDULERS)


@pytest.mark.parametrize("name", list(OBJECTS))
def test_object_roundtrips_exactly(ckpt_path: Path, name: str) -> None:
    original = OBJECTS[name](True)
    before = snapshot(original)
    unbroken.save(ckpt_path, {name: original})
    assert_exactly_equal(snapshot(original), before)  # saving does not disturb the live object

    fresh = OBJECTS[name](False)
    assert not exactly_equal(snapshot(fresh), before), "the fresh object must differ, or the test proves nothing"
    unbroken.load(ckpt_path, {name: fresh})
    assert_exactly_equal(snapshot(fresh), before)


def test_optimizer_state_keeps_int_keys_step_tensors_and_tuple_betas(ckpt_path: Path) -> None:
    opt = _optimizer("adamw")(True)
    unbroken.save(ckpt_path, {"opt": opt})
    fresh = _optimizer("adamw")(False)
    unbroken.load(ckpt_path, {"opt": fresh})
    sd = fresh.state_dict()
    assert sorted(sd["state"]) == list(range(6)) and all(type(k) is int for k in sd["state"])
    step = sd["state"][0]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.item() == 2.0
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999) and type(sd["param_groups"][0]["betas"]) is tuple
    assert sd["param_groups"][0]["foreach"] is None and sd["param_groups"][0]["amsgrad"] is True


def test_lambda_lr_callable_settings_are_restored(ckpt_path: Path) -> None:
    sched = _scheduler("lambda")(True)
    unbroken.save(ckpt_path, {"sched": sched})
    fresh = _scheduler("lambda")(False)
    assert fresh.lr_lambdas[0].warmup == 9
    unbroken.load(ckpt_path, {"sched": fresh})
    assert fresh.lr_lambdas[0].warmup == 3
    assert fresh.get_last_lr() == sched.get_last_lr()


def test_module_num_batches_tracked_and_buffers(ckpt_path: Path) -> None:
    model = _trained_mlp(0)
    unbroken.save(ckpt_path, {"model": model})
    fresh = make_mlp(1)
    unbroken.load(ckpt_path, {"model": fresh})
    bn = fresh[1]
    assert bn.num_batches_tracked.dtype == torch.int64 and bn.num_batches_tracked.item() == 2
    assert torch.equal(bn.running_var, model[1].running_var)


# ---------------------------------------------------------------------------------------------
# plain values
# ---------------------------------------------------------------------------------------------

ARGS = {"lr": 0.1, "betas": (0.9, 0.99), "milestones": [3, 6], "nested": {"t": (1, (2, 3.5)), 4: None},
        "inf": math.inf, "nan": math.nan, "flag": False, "name": "exp1", "big": 2**70}


def test_plain_values_roundtrip_and_are_replaced_not_mutated(ckpt_path: Path) -> None:
    ns = argparse.Namespace(lr=3e-4, betas=(0.9, 0.95), layers=[64, 64], seed=None, amp=True)
    unbroken.save(ckpt_path, {"epoch": 7, "args": ARGS, "ns": ns, "history": [0.5, 0.25],
                              "ratio": 0.1 + 0.2, "tag": "run-a", "none": None})
    user_args: dict[str, Any] = {"stale": 1}
    user_ns = argparse.Namespace(stale=True)
    user_history: list[float] = []
    live: dict[str, Any] = {"epoch": 0, "args": user_args, "ns": user_ns, "history": user_history,
                            "ratio": 0.0, "tag": "", "none": 5}
    unbroken.load(ckpt_path, live)
    assert_exactly_equal(live["epoch"], 7)
    assert_exactly_equal(live["args"], ARGS)
    assert_exactly_equal(live["ns"], ns)
    assert_exactly_equal(live["history"], [0.5, 0.25])
    assert_exactly_equal(live["ratio"], 0.1 + 0.2)
    assert live["tag"] == "run-a" and live["none"] is None
    # the state dict holds the checkpoint's values; objects the user also holds keep their own
    assert user_args == {"stale": 1} and vars(user_ns) == {"stale": True} and user_history == []


# ---------------------------------------------------------------------------------------------
# a whole training state, and resuming
# ---------------------------------------------------------------------------------------------

def test_whole_training_state_roundtrips(ckpt_path: Path) -> None:
    state = make_training_state(0, trained=True)
    before = {k: snapshot(v) for k, v in state.items()}
    unbroken.save(ckpt_path, state, step=3)
    fresh = make_training_state(1, trained=False)
    unbroken.load(ckpt_path, fresh)
    assert_exactly_equal({k: snapshot(v) for k, v in fresh.items()}, before)


def test_two_ema_rates_and_a_target_model_side_by_side(ckpt_path: Path) -> None:
    model = _trained_mlp(0)
    fast, slow = make_ema(model, 0.9), make_ema(model, 0.999)
    target = make_mlp(5)
    target.load_state_dict(model.state_dict())
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1 + i)
        fast.update_parameters(model)
        slow.update_parameters(model)
    state = {"model": model, "ema_fast": fast, "ema_slow": slow, "target": target}
    before = {k: snapshot(v) for k, v in state.items()}
    assert not exactly_equal(before["ema_fast"], before["ema_slow"])
    unbroken.save(ckpt_path, state)

    fresh_model = make_mlp(1)
    fresh = {"model": fresh_model, "ema_fast": make_ema(fresh_model, 0.9), "ema_slow": make_ema(fresh_model, 0.999),
             "target": make_mlp(2)}
    unbroken.load(ckpt_path, fresh)
    assert_exactly_equal({k: snapshot(v) for k, v in fresh.items()}, before)


def _batches(seed: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=gen) for _ in range(n)]


def _continue(state: dict[str, Any], batches: list[torch.Tensor]) -> None:
    model, opt, sched, scaler, ema = (state[k] for k in ("model", "optimizer", "scheduler", "scaler", "ema"))
    for x in batches:
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema.update_parameters(model)


def test_resume_is_indistinguishable_from_not_stopping(ckpt_path: Path) -> None:
    state = make_training_state(0, trained=True)
    unbroken.save(ckpt_path, state, step=3)
    batches = _batches(42, 4)
    _continue(state, batches)

    resumed = make_training_state(1, trained=False)
    unbroken.load(ckpt_path, resumed)
    _continue(resumed, batches)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema"):
        assert_exactly_equal(snapshot(resumed[key]), snapshot(state[key]), key)


# ---------------------------------------------------------------------------------------------
# wrappers: names stored unwrapped, checkpoints move between wrappers
# ---------------------------------------------------------------------------------------------

def _stored_tensor_names(path: Path) -> list[str]:
    return list(json.loads((path / MANIFEST_NAME).read_bytes())["tensors"])


def _compiled(model: nn.Module) -> nn.Module:
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    try:
        return torch.compile(model)
    except Exception as exc:  # e.g. an unsupported Python version
        pytest.skip(f"torch.compile is unavailable here: {exc}")


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda m: m,
    "data_parallel": nn.DataParallel,
    "compiled": _compiled,
}


@pytest.mark.parametrize("saved_as", list(WRAPPERS))
@pytest.mark.parametrize("loaded_as", list(WRAPPERS))
def test_checkpoints_move_between_wrappers(ckpt_path: Path, saved_as: str, loaded_as: str) -> None:
    model = _trained_mlp(0)
    expected = snapshot(model)
    unbroken.save(ckpt_path, {"model": WRAPPERS[saved_as](model)})
    names = _stored_tensor_names(ckpt_path)
    model_names = [n for n in names if n.startswith("model/")]
    assert sorted(model_names) == sorted(f"model/{k}" for k in expected)
    assert not any("_orig_mod." in n or "module." in n for n in names)

    fresh = make_mlp(1)
    unbroken.load(ckpt_path, {"model": WRAPPERS[loaded_as](fresh)})
    assert_exactly_equal(snapshot(fresh), expected)


# ---------------------------------------------------------------------------------------------
# random streams
# ---------------------------------------------------------------------------------------------

def _draws() -> tuple[Any, ...]:
    return (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(),
            torch.rand(4), torch.randn(2))


def test_rng_streams_continue_exactly_after_load(ckpt_path: Path) -> None:
    random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.seed(6)
    np.random.standard_normal()  # and in NumPy's
    torch.manual_seed(7)
    unbroken.save(ckpt_path, {"epoch": 1})
    expected = _draws()
    _draws()
    torch.manual_seed(123)
    unbroken.load(ckpt_path, {"epoch": 0})
    assert_exactly_equal(_draws(), expected)


def test_rng_is_left_alone_with_rng_false(ckpt_path: Path) -> None:
    unbroken.save(ckpt_path, {"epoch": 1})
    right_after_save = _draws()
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    expected = _draws()
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    unbroken.load(ckpt_path, {"epoch": 0}, rng=False)
    got = _draws()
    assert_exactly_equal(got, expected)
    assert not exactly_equal(got, right_after_save)


# ---------------------------------------------------------------------------------------------
# mismatches
# ---------------------------------------------------------------------------------------------

def test_dtype_mismatch_strict_and_non_strict(ckpt_path: Path) -> None:
    model = _trained_mlp(0)
    unbroken.save(ckpt_path, {"model": model})
    fresh = make_mlp(1).to(torch.float64)
    before = snapshot(fresh)
    with pytest.raises(StateMismatchError) as info:
        unbroken.load(ckpt_path, {"model": fresh})
    message = str(info.value)
    assert "float32" in message and "float64" in message and "0.weight" in message
    assert_exactly_equal(snapshot(fresh), before)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        unbroken.load(ckpt_path, {"model": fresh}, strict=False)
    after = fresh.state_dict()
    for key, value in model.state_dict().items():
        assert after[key].dtype == (torch.float64 if value.is_floating_point() else value.dtype)
        assert torch.equal(after[key], value.to(after[key].dtype)), key


def test_mismatched_model_lists_every_problem_and_changes_nothing(ckpt_path: Path) -> None:
    saved = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    unbroken.save(ckpt_path, {"model": saved, "opt": torch.optim.SGD(saved.parameters(), lr=0.1)})
    live_model = make_mlp(1, width=16, extra_layer=True)  # wider, and its extra layer sits at index 5
    live_opt = torch.optim.SGD(list(live_model.parameters())[:4], lr=0.5)  # 4 params, the checkpoint has 8
    live = {"model": live_model, "opt": live_opt, "extra": 1}
    before = {k: snapshot(v) for k, v in live.items()}
    with pytest.raises(StateMismatchError) as info:
        unbroken.load(ckpt_path, live)
    message = str(info.value)
    assert "missing key '5.weight'" in message and "missing key '5.bias'" in message
    assert "unexpected key '4.weight'" in message and "unexpected key '4.bias'" in message
    assert "'0.weight' has shape [8, 4] in the checkpoint but [16, 4]" in message
    assert "'1.running_mean'" in message
    assert "'extra'" in message
    assert "param groups of sizes [8] but the optimizer has [4]" in message
    assert "Fix" in message
    assert_exactly_equal({k: snapshot(v) for k, v in live.items()}, before)


def test_non_strict_load_of_a_mismatched_model_loads_what_matches(ckpt_path: Path) -> None:
    saved = make_mlp(0)
    unbroken.save(ckpt_path, {"model": saved})
    live = make_mlp(1, extra_layer=True)
    extra_before = live[5].weight.detach().clone()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        unbroken.load(ckpt_path, {"model": live}, strict=False)
    for key, value in saved.state_dict().items():
        assert torch.equal(live.state_dict()[key], value), key
    assert torch.equal(live[5].weight, extra_before)  # not in the checkpoint: left as it was


def test_object_of_another_kind_is_a_mismatch(ckpt_path: Path) -> None:
    unbroken.save(ckpt_path, {"thing": make_mlp(0)})
    with pytest.raises(StateMismatchError, match="saved as module"):
        unbroken.load(ckpt_path, {"thing": TensorBag(1)})


# ---------------------------------------------------------------------------------------------
# unserializable state: refused at save, nothing written
# ---------------------------------------------------------------------------------------------

class _HoldsLambda:
    def __init__(self) -> None:
        self.fn = lambda epoch: 0.5 ** epoch

    def __call__(self, epoch: int) -> float:
        return self.fn(epoch)


def _lambda_scheduler_holding_a_function() -> Any:
    opt = torch.optim.SGD(make_mlp(0).parameters(), lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=_HoldsLambda())


class _Unpicklable:
    def state_dict(self) -> dict[str, Any]:
        return {"ok": 1, "handle": open(__file__)}  # noqa: SIM115 - the point is an unsaveable value

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize("state, where", [
    (lambda: {"fn": lambda x: x}, "fn"),
    (lambda: {"sched": _lambda_scheduler_holding_a_function()}, "sched/lr_lambdas/0/fn"),
    (lambda: {"cfg": {"ok": 1, "bad": {1, 2}}}, "cfg/bad"),
    (lambda: {"obj": _Unpicklable()}, "obj/handle"),
    (lambda: {"model": make_mlp(0), "extra": object()}, "extra"),
    (lambda: {"z": torch.zeros(2, dtype=torch.complex128)}, "z"),  # complex64 is stored; safetensors has no C128
], ids=["lambda", "scheduler-fn", "set", "file-handle", "object", "complex-tensor"])
def test_unserializable_state_is_refused_and_nothing_is_written(ckpt_path: Path, state: Any, where: str) -> None:
    with pytest.raises(UnserializableStateError) as info:
        unbroken.save(ckpt_path, state())
    assert where in str(info.value)
    assert "Fix" in str(info.value)
    assert not ckpt_path.exists()
    assert list(ckpt_path.parent.iterdir()) == []  # no staging leftovers either


def test_huge_int_roundtrips(ckpt_path: Path) -> None:
    unbroken.save(ckpt_path, {"n": 10**5000})
    live: dict[str, Any] = {"n": 0}
    unbroken.load(ckpt_path, live)
    assert live["n"] == 10**5000


# ---------------------------------------------------------------------------------------------
# the shared conftest fixtures are what they claim, and each survives save → load into itself
# ---------------------------------------------------------------------------------------------

FIXTURES = ["mlp", "adam", "adamw", "sgd_momentum", "step_lr", "cosine_lr", "onecycle_lr", "lambda_lr",
            "sequential_lr", "grad_scaler", "ema", "tensor_bag"]


def test_fixture_properties(adam: Any, adamw: Any, sgd_momentum: Any, sequential_lr: Any, grad_scaler: Any,
                            ema: Any, mlp: nn.Module, fresh_mlp: nn.Module) -> None:
    for opt in (adam, adamw):
        state = opt.state_dict()["state"]
        assert len(state) == 6 and all(isinstance(s["step"], torch.Tensor) and s["step"].item() == 2.0
                                       for s in state.values())
    assert all("momentum_buffer" in s for s in sgd_momentum.state_dict()["state"].values())
    assert sequential_lr.last_epoch == 3 and len(sequential_lr.state_dict()["_schedulers"]) == 2
    assert grad_scaler.state_dict() != torch.amp.GradScaler("cpu").state_dict()
    assert ema.n_averaged.item() == 2
    assert mlp[1].num_batches_tracked.item() == 2
    assert not torch.equal(mlp[0].weight, fresh_mlp[0].weight)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_object_reloads_into_itself(ckpt_path: Path, request: pytest.FixtureRequest, fixture: str) -> None:
    obj = request.getfixturevalue(fixture)
    before = snapshot(obj)
    unbroken.save(ckpt_path, {fixture: obj})
    unbroken.load(ckpt_path, {fixture: obj})
    assert_exactly_equal(snapshot(obj), before)
