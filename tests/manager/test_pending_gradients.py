"""A save between gradient-accumulation micro-steps is warned about, once per manager, naming the fix;
the loops whose gradients are non-zero at a save but already applied are not (issue 18 item 3)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from unbroken import CheckpointManager
from unbroken.manager.pending_grads import PendingGradientsWarning, watch_optimizer_steps


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _backward(model: nn.Module) -> None:
    model(torch.randn(3, 4)).pow(2).sum().backward()


def _pending_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PendingGradientsWarning)]


def test_a_save_between_accumulation_micro_steps_warns_once_naming_the_fix(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(tmp_path, {"model": model, "optimizer": opt}, every_steps=3, async_save=False) as ckpt:
            micro = 0
            for _ in range(4):  # 2 micro-steps per optimizer step, the step reported per micro-step
                for _ in range(2):
                    _backward(model)
                    micro += 1
                    ckpt.step(micro)  # saves at micro-steps 3 and 6, before the optimizer step: mid-accumulation
                opt.step()
                opt.zero_grad()
        assert [r.step for r in ckpt.list()] == [3, 6, 8]
    messages = _pending_warnings(caught)
    assert len(messages) == 1, messages
    assert "between gradient-accumulation micro-steps" in messages[0]
    assert "after optimizer.step() and optimizer.zero_grad()" in messages[0]


def test_a_loop_that_zeroes_gradients_before_backward_is_not_warned(tmp_path: Path) -> None:
    """Every save sees non-zero .grad here, already applied by the optimizer: harmless."""
    model, opt = _model_and_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(tmp_path, {"model": model, "optimizer": opt}, every_steps=1, async_save=False) as ckpt:
            for step in range(1, 4):
                opt.zero_grad(set_to_none=False)
                _backward(model)
                opt.step()
                assert model.weight.grad is not None and bool(model.weight.grad.any())
                ckpt.step(step)
    assert _pending_warnings(caught) == []


def test_gradients_zeroed_in_place_after_the_step_are_not_pending(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(tmp_path, {"model": model, "optimizer": opt}, every_steps=1, async_save=False) as ckpt:
            for step in range(1, 3):
                _backward(model)
                opt.step()
                opt.zero_grad(set_to_none=False)  # modified in place after the step, but all zero
                ckpt.step(step)
    assert _pending_warnings(caught) == []


def test_a_gan_whose_generator_backward_fills_the_discriminator_grads_is_not_warned(tmp_path: Path) -> None:
    """The generator's loss flows through the discriminator after the discriminator's step, leaving
    gradients there; the generator's own step consumed its gradients, so nothing is pending."""
    gen, opt_g = _model_and_optimizer(1)
    disc = nn.Linear(2, 1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    state = {"gen": gen, "disc": disc, "opt_g": opt_g, "opt_d": opt_d}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(tmp_path, state, every_steps=1, async_save=False) as ckpt:
            for step in range(1, 3):
                opt_d.zero_grad()
                disc(gen(torch.randn(3, 4)).detach()).sum().backward()
                opt_d.step()
                opt_g.zero_grad()
                disc(gen(torch.randn(3, 4))).sum().backward()
                opt_g.step()
                ckpt.step(step)
    assert _pending_warnings(caught) == []


def test_another_optimizer_of_the_process_does_not_hide_the_manager_s_pending_gradients(tmp_path: Path) -> None:
    """Optimizers outside the manager's state (another run's, a notebook's earlier cell's) do not count."""
    watch_optimizer_steps()  # as any earlier manager of the process installed it
    other, other_opt = _model_and_optimizer(2)
    _backward(other)
    other_opt.step()  # its gradients are consumed: it alone would say "nothing pending"
    model, opt = _model_and_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(tmp_path, {"model": model, "optimizer": opt}, every_steps=3, async_save=False) as ckpt:
            for micro in range(1, 5):
                _backward(model)
                ckpt.step(micro)  # the save at 3 is mid-accumulation
                if micro % 2 == 0:
                    opt.step()
                    opt.zero_grad()
    assert len(_pending_warnings(caught)) == 1
    assert other_opt is not None
