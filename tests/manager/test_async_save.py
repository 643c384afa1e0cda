"""Background saves: snapshot isolation, error propagation, back-pressure, close(), chunked staging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import unbroken
from tests.mounts import tmpfs
from unbroken import CheckpointManager, StorageError


def tensors_of(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt_dir / "rank00000.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


def state_with(big_mb: int = 0) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt, "flags": torch.tensor([True, False]), "half": torch.randn(5).half()}
    if big_mb:
        state["big"] = BigBuffer(big_mb)
    return state


class BigBuffer:
    def __init__(self, mb: int) -> None:
        self.data = torch.arange(mb * 262_144, dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.data.copy_(state["data"])


def test_async_and_sync_checkpoints_are_bitwise_equal(tmp_path: Path) -> None:
    for mode, async_save in (("async", True), ("sync", False)):
        state = state_with(big_mb=3)
        ckpt = CheckpointManager(tmp_path / mode, state, every_steps=1, async_save=async_save, capture_rng=False)
        assert ckpt.step(1) is True
        ckpt.close()
    a, b = tmp_path / "async" / "step_000000001", tmp_path / "sync" / "step_000000001"
    assert bitwise_equal(tensors_of(a), tensors_of(b))
    assert unbroken.read_info(a).manifest.state == unbroken.read_info(b).manifest.state
    assert unbroken.verify(a).valid


def test_step_returns_a_snapshot_that_later_updates_do_not_touch(tmp_path: Path) -> None:
    state = state_with(big_mb=16)
    ckpt = CheckpointManager(tmp_path, state, every_steps=1, capture_rng=False)
    expected = state["big"].data.clone()
    ckpt.step(1)
    state["big"].data.fill_(-1.0)  # the training loop goes on immediately
    with torch.no_grad():
        state["model"][0].weight.zero_()
    ckpt.close()
    saved = tensors_of(tmp_path / "step_000000001")
    assert torch.equal(saved["big/data"], expected)
    assert saved["model/0.weight"].abs().sum() > 0


def test_background_failure_surfaces_on_the_next_call_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="2m") as small:
        state = state_with()
        ckpt = CheckpointManager(small, state, every_steps=1, save_on_close=False)
        ckpt.step(1)
        ckpt.wait()
        state["big"] = BigBuffer(3)  # 3 MB on a 2 MB filesystem
        assert ckpt.step(2) is True  # returns once staged; the write fails in the background
        with pytest.raises(StorageError, match="saving step 2.*No space left"):
            for step in range(3, 1000):  # surfaces on a following step() (never silently lost)
                ckpt.step(step)
                ckpt.wait()
        assert [r.step for r in unbroken.list_checkpoints(small)] == [1]
        assert sorted(p.name for p in small.iterdir() if p.name not in (".lock", "events.jsonl")) == ["step_000000001"]
        assert unbroken.verify(small / "step_000000001").valid
        del state["big"]
        assert ckpt.save(step=1000).step == 1000  # training and saving go on
        ckpt.close()


def test_error_surfaces_at_close_too(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="1m") as small:
        state = state_with(big_mb=2)
        ckpt = CheckpointManager(small, state, every_steps=1, save_on_close=False)
        ckpt.step(1)
        with pytest.raises(StorageError, match="No space left"):
            ckpt.close()
        assert unbroken.list_checkpoints(small) == []


def test_busy_wait_commits_both_and_skip_warns(tmp_path: Path) -> None:
    state = state_with(big_mb=256)
    waiting = CheckpointManager(tmp_path / "wait", state, every_steps=1, capture_rng=False, save_on_close=False)
    assert waiting.step(1) and waiting.step(2)
    waiting.close()
    assert [r.step for r in unbroken.list_checkpoints(tmp_path / "wait")] == [1, 2]

    skipping = CheckpointManager(tmp_path / "skip", state, every_steps=1, capture_rng=False, when_busy="skip",
                                 save_on_close=False)
    assert skipping.step(1) is True
    with pytest.warns(RuntimeWarning, match="step 2 skipped: the previous save is still being written"):
        assert skipping.step(2) is False  # 256 MB are still being written and fsynced
    skipping.close()
    assert [r.step for r in unbroken.list_checkpoints(tmp_path / "skip")] == [1]


def test_close_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    state = state_with(big_mb=64)
    with CheckpointManager(tmp_path, state, every_steps=1, capture_rng=False) as ckpt:
        ckpt.step(1)
    assert unbroken.verify(tmp_path / "step_000000001").valid


def test_an_exception_in_the_loop_still_lets_a_completed_save_commit(tmp_path: Path) -> None:
    state = state_with(big_mb=32)
    with pytest.raises(ZeroDivisionError):
        with CheckpointManager(tmp_path, state, every_steps=1, capture_rng=False) as ckpt:
            ckpt.step(1)
            1 / 0  # noqa: B018 (the exception under test)
    assert [r.step for r in unbroken.list_checkpoints(tmp_path)] == [1]


@pytest.mark.parametrize("budget_mb", [0.25, 1.0])
def test_state_larger_than_the_staging_budget_is_staged_in_chunks(tmp_path: Path, budget_mb: float) -> None:
    state = state_with(big_mb=5)  # one tensor alone is larger than every chunk
    ckpt = CheckpointManager(tmp_path / "chunked", state, every_steps=1, capture_rng=False,
                             staging_budget_mb=budget_mb)
    ckpt.step(1)
    assert ckpt._saver._buffers.allocated_bytes <= budget_mb * 1024 * 1024
    ckpt.close()
    unbroken.save(tmp_path / "reference", state, step=1, rng=False)
    assert bitwise_equal(tensors_of(tmp_path / "chunked" / "step_000000001"), tensors_of(tmp_path / "reference"))
    assert unbroken.verify(tmp_path / "chunked" / "step_000000001").valid


def test_staging_buffers_are_reused(tmp_path: Path) -> None:
    state = state_with(big_mb=4)
    ckpt = CheckpointManager(tmp_path, state, every_steps=1, capture_rng=False, keep_last=1)
    ckpt.step(1)
    ckpt.wait()
    first = [b.data_ptr() for b in ckpt._saver._buffers._buffers]
    ckpt.step(2)
    ckpt.wait()
    assert [b.data_ptr() for b in ckpt._saver._buffers._buffers] == first
    ckpt.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"when_busy": "queue"}, "when_busy"), ({"staging_budget_mb": 0}, "staging_budget_mb"),
    ({"async_save": "yes"}, "async_save"),
])
def test_bad_async_settings(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        CheckpointManager(tmp_path, {"x": 1}, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_are_staged_in_pinned_memory(tmp_path: Path) -> None:
    model = nn.Linear(256, 256).cuda()
    ckpt = CheckpointManager(tmp_path, {"model": model}, every_steps=1)
    ckpt.step(1)
    assert all(b.is_pinned() for b in ckpt._saver._buffers._buffers)
    ckpt.close()
    restored = nn.Linear(256, 256)
    unbroken.load(tmp_path / "step_000000001", {"model": restored})
    assert torch.equal(restored.weight, model.weight.cpu())


def test_a_new_or_restored_manager_prepares_the_first_saves_staging_buffers(tmp_path: Path) -> None:
    """The first background save must not pay the page faults of fresh buffers: a manager prepares
    them in the background at construction, and again after restore() (the state may have grown)."""
    state = {"w": torch.ones(256 * 1024)}  # 1 MiB
    ckpt = CheckpointManager(tmp_path / "run", state, async_save=True, every_steps=1)
    buffers = ckpt._saver._buffers
    assert buffers is not None and buffers._preparing is not None
    buffers._preparing.join(30)
    assert buffers.allocated_bytes >= 1 << 20
    ckpt.step(1)
    ckpt.close()
    bigger = {"w": torch.ones(1024 * 1024)}  # 4 MiB: what a resumed state may hold that the new one did not
    again = CheckpointManager(tmp_path / "run2", {"w": torch.zeros(16)}, async_save=True)
    unbroken.save(tmp_path / "run2" / "step_000000001", bigger, step=1)
    again.state = bigger
    assert again.restore() == 1
    prepared = again._saver._buffers
    assert prepared is not None and prepared._preparing is not None
    prepared._preparing.join(30)
    assert prepared.allocated_bytes >= 4 << 20
    again.close()
    sync = CheckpointManager(tmp_path / "run3", state, async_save=False)
    assert sync._saver._buffers is None  # a synchronous save writes from the live tensors: nothing to prepare
    sync.close()
