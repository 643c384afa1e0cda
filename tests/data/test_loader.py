"""unbroken.DataLoader and plain DataLoaders registered in a manager: exact order, position and randomness."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

import unbroken
from unbroken import CheckpointManager, StateMismatchError, UnserializableStateError

from .datasets import AugmentedSquares, CountingStream


def batches(loader, epochs: int = 2) -> list[torch.Tensor]:
    return [b for _ in range(epochs) for b in loader]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_randomness_is_independent_of_the_number_of_workers(workers: int) -> None:
    reference = batches(unbroken.DataLoader(AugmentedSquares(), batch_size=4, shuffle=True, seed=0))
    other = batches(unbroken.DataLoader(AugmentedSquares(), batch_size=4, shuffle=True, seed=0,
                                        num_workers=workers))
    assert same(reference, other)
    assert not torch.equal(reference[0][:, 1:], reference[0][:, 1:].roll(1, 0))  # the noise is real


def test_loading_data_never_touches_the_training_rng() -> None:
    loader = unbroken.DataLoader(AugmentedSquares(), batch_size=4, shuffle=True, seed=0)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    batches(loader)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kwargs", [
    {"batch_size": 4, "shuffle": True},
    {"batch_size": 4, "shuffle": True, "drop_last": True},
    {"batch_size": 4, "shuffle": False},
    {"batch_size": None, "shuffle": True},
    {"batch_size": 4, "shuffle": True, "num_workers": 2},
    {"batch_size": 4, "shuffle": True, "num_workers": 2, "persistent_workers": True},
])
@pytest.mark.parametrize("stop", [1, 5, 9, 10, 14])
def test_resume_at_any_position_yields_the_rest_exactly(kwargs: dict, stop: int) -> None:
    reference = batches(unbroken.DataLoader(AugmentedSquares(), seed=3, **kwargs), epochs=3)
    loader = unbroken.DataLoader(AugmentedSquares(), seed=3, **kwargs)
    stream = (b for _ in range(3) for b in loader)
    head = list(itertools.islice(stream, stop))
    state = loader.state_dict()
    del stream
    resumed = unbroken.DataLoader(AugmentedSquares(), seed=99, **kwargs)
    resumed.load_state_dict(state)
    rest = batches(resumed, epochs=3)[: len(reference) - stop]
    assert same(head + rest, reference)


def test_prefetching_workers_do_not_advance_the_saved_position() -> None:
    loader = unbroken.DataLoader(AugmentedSquares(), batch_size=2, num_workers=2, prefetch_factor=4, seed=0)
    it = iter(loader)
    next(it)
    next(it)
    assert loader.state_dict()["cursor"]["position"] == 2


def test_custom_batch_sampler_and_foreign_sampler() -> None:
    data = AugmentedSquares()
    custom = BatchSampler(SequentialSampler(data), 5, False)

    class MyBatches(BatchSampler):
        pass

    for make in (lambda: unbroken.DataLoader(data, batch_sampler=MyBatches(SequentialSampler(data), 5, False)),
                 lambda: unbroken.DataLoader(data, batch_size=3,
                                             sampler=DistributedSampler(data, num_replicas=2, rank=1, seed=4))):
        reference = batches(make())
        loader = make()
        head = list(itertools.islice(iter(loader), 3))
        resumed = make()
        resumed.load_state_dict(loader.state_dict())
        assert same(head + batches(resumed)[: len(reference) - 3], reference)
    assert len(custom) == 8


def run_registered(run: Path, loader_factory, stop: int | None) -> list[torch.Tensor]:
    """Iterate 2 epochs through a manager that saves every batch; stop (crash) after `stop` batches.
    Saves are synchronous: an in-process "crash" must not leave a writer thread running."""
    loader = loader_factory()
    state = {"loader": loader, "epoch": 0}
    ckpt = CheckpointManager(run, state, every_steps=1, save_on_close=False, async_save=False)
    step = ckpt.restore()
    seen = []
    for epoch in range(state["epoch"], 2):
        state["epoch"] = epoch
        for batch in loader:
            step += 1
            seen.append(batch)
            ckpt.step(step)
            if step == stop:
                return seen
        state["epoch"] = epoch + 1
    return seen


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 10, 11, 17])  # mid-epoch, last batch of epoch 0, first of epoch 1, epoch 1
def test_plain_torch_dataloader_registered_in_a_manager_resumes_exactly(tmp_path: Path, workers: int,
                                                                       stop: int) -> None:
    def factory() -> DataLoader:
        torch.manual_seed(0)
        return DataLoader(AugmentedSquares(), batch_size=4, shuffle=True, num_workers=workers)

    reference = run_registered(tmp_path / "ref", factory, None)
    head = run_registered(tmp_path / "run", factory, stop)
    rest = run_registered(tmp_path / "run", factory, None)
    assert same(head + rest, reference)


def test_registration_converts_the_same_object(tmp_path: Path) -> None:
    loader = DataLoader(AugmentedSquares(), batch_size=4)
    CheckpointManager(tmp_path, {"loader": loader})
    assert isinstance(loader, unbroken.DataLoader)
    assert len(loader) == 10 and len(loader.base_dataset) == 37


@pytest.mark.parametrize("change, message", [
    ({"n": 41}, "dataset_len was 37 when saved but is 41"),
    ({"batch_size": 5}, "batch_size was 4 when saved but is 5"),
])
def test_resume_with_a_different_dataset_or_batch_size_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    loader = unbroken.DataLoader(AugmentedSquares(), batch_size=4, seed=0)
    ckpt = CheckpointManager(tmp_path, {"loader": loader}, save_on_close=False)
    next(iter(loader))
    ckpt.save(step=1)
    other = unbroken.DataLoader(AugmentedSquares(change.get("n", 37)), batch_size=change.get("batch_size", 4))
    with pytest.raises(StateMismatchError, match=message):
        CheckpointManager(tmp_path, {"loader": other}).restore()


def test_plain_loader_cannot_be_saved_unregistered(tmp_path: Path) -> None:
    with pytest.raises(UnserializableStateError, match="register it in a CheckpointManager"):
        unbroken.save(tmp_path / "ck", {"loader": DataLoader(AugmentedSquares())})


def test_plain_loader_over_an_iterable_dataset_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UnserializableStateError, match="StatefulDataLoader"):
        CheckpointManager(tmp_path, {"loader": DataLoader(CountingStream(), batch_size=2)})


def test_stateful_dataloader_over_an_iterable_dataset_resumes_exactly(tmp_path: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def factory():
        return stateful.StatefulDataLoader(CountingStream(), batch_size=3, num_workers=2,
                                           generator=torch.Generator().manual_seed(0))

    reference = run_registered(tmp_path / "ref", factory, None)
    for stop in (4, 7, 9):
        head = run_registered(tmp_path / f"run{stop}", factory, stop)
        rest = run_registered(tmp_path / f"run{stop}", factory, None)
        assert same(head + rest, reference), stop
