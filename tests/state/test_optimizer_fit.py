"""Optimizer state that no longer fits its parameter is never loaded into it.

A parameter whose shape changed (a wider layer, a new number of inputs) cannot use the moments saved
for its old shape: loaded anyway, the first ``opt.step()`` fails inside torch.  strict=True refuses
the load and names the entry; strict=False leaves that parameter's optimizer state fresh ('step'
included) and reports it next to the model mismatches.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import unbroken
from tests.helpers import assert_exactly_equal, snapshot
from unbroken.errors import StateMismatchError


def _model(inputs: int, width: int) -> nn.Sequential:
    torch.manual_seed(inputs * 100 + width)
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, 3))


def _stepped(model: nn.Module, opt: torch.optim.Optimizer, inputs: int) -> torch.optim.Optimizer:
    """One optimizer step, so that every parameter has its per-element state."""
    opt.zero_grad()
    model(torch.randn(5, inputs)).square().sum().backward()
    opt.step()
    return opt


def _restore(path: Path, live: dict[str, Any], strict: bool) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unbroken.load(path, live, strict=strict)
    return "\n".join(str(w.message) for w in caught)


def test_strict_false_skips_optimizer_state_that_no_longer_fits(ckpt_path: Path) -> None:
    saved_model = _model(8, 8)
    saved_opt = _stepped(saved_model, torch.optim.Adam(saved_model.parameters(), lr=0.1), 8)
    unbroken.save(ckpt_path, {"model": saved_model, "opt": saved_opt})
    kept_state = snapshot(saved_opt.state[saved_model[2].bias])  # [3] in both models

    live_model = _model(4, 16)  # 0.weight, 0.bias and 2.weight change shape; 2.bias does not
    live_opt = torch.optim.Adam(live_model.parameters(), lr=0.1)
    message = _restore(ckpt_path, {"model": live_model, "opt": live_opt}, strict=False)

    assert "'0.weight' has shape [8, 8] in the checkpoint but [16, 4]" in message  # the model, as before
    for index, saved_shape, live_shape in ((0, [8, 8], [16, 4]), (1, [8], [16]), (2, [3, 8], [3, 16])):
        assert (f"'opt': optimizer state of param {index} has 'exp_avg', 'exp_avg_sq' of shape {saved_shape} "
                f"but the parameter has shape {live_shape}") in message
    assert "param 3" not in message
    state = live_opt.state
    assert [len(state[p]) for p in live_model.parameters()] == [0, 0, 0, 3]  # fresh: no stale 'step' either
    assert_exactly_equal(snapshot(state[live_model[2].bias]), kept_state)

    _stepped(live_model, live_opt, 4)  # failed inside torch before the fix
    assert [state[p]["step"].item() for p in live_model.parameters()] == [1.0, 1.0, 1.0, 2.0]
    assert all(state[p]["exp_avg"].shape == p.shape for p in live_model.parameters())


def test_strict_load_refuses_optimizer_state_that_no_longer_fits(ckpt_path: Path) -> None:
    saved_model = _model(8, 8)
    saved_opt = _stepped(saved_model, torch.optim.Adam(saved_model.parameters(), lr=0.1), 8)
    unbroken.save(ckpt_path, {"opt": saved_opt})  # no model in the checkpoint: only the optimizer can tell
    live_model = _model(4, 16)
    live_opt = _stepped(live_model, torch.optim.Adam(live_model.parameters(), lr=0.1), 4)
    before = snapshot(live_opt)
    with pytest.raises(StateMismatchError) as info:
        unbroken.load(ckpt_path, {"opt": live_opt})
    message = str(info.value)
    assert ("'opt': optimizer state of param 0 has 'exp_avg', 'exp_avg_sq' of shape [8, 8] but the parameter "
            "has shape [16, 4]") in message
    assert "Fix" in message and "strict=False" in message
    assert_exactly_equal(snapshot(live_opt), before)


def _adafactor(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(model.parameters(), lr=0.01)


def _lbfgs(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    x = torch.randn(5, 8)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return opt


@pytest.mark.parametrize("build", [
    lambda m: _stepped(m, _adafactor(m), 8),  # factored state: row_var [n, 1] and col_var [1, m]
    _lbfgs,  # flat state over all parameters, kept in the first parameter's slot
    lambda m: _stepped(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 8),
], ids=["adafactor", "lbfgs", "sgd_momentum"])
def test_optimizer_state_that_fits_its_parameters_in_other_shapes_loads_strictly(ckpt_path: Path, build: Any) -> None:
    saved_model = _model(8, 8)
    saved_opt = build(saved_model)
    unbroken.save(ckpt_path, {"model": saved_model, "opt": saved_opt})
    live_model = _model(8, 8)
    live_opt = build(live_model)
    unbroken.load(ckpt_path, {"model": live_model, "opt": live_opt})
    assert_exactly_equal(snapshot(live_opt), snapshot(saved_opt))


def test_lbfgs_state_of_a_resized_model_is_left_fresh(ckpt_path: Path) -> None:
    saved_model = _model(8, 8)
    unbroken.save(ckpt_path, {"opt": _lbfgs(saved_model)})
    live_model = _model(8, 16)
    live_opt = torch.optim.LBFGS(live_model.parameters(), lr=0.1, max_iter=2)
    message = _restore(ckpt_path, {"opt": live_opt}, strict=False)
    assert "'opt': optimizer state of param 0 has 'd', 'prev_flat_grad' of shape [99]" in message
    assert not live_opt.state
