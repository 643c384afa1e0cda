"""ResumableSampler: order from (seed, epoch), DistributedSampler-compatible sharding, O(1) resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from unbroken import ResumableSampler, StateMismatchError


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size, drop_last", [(1, False), (3, False), (3, True), (4, False)])
def test_same_indices_as_distributed_sampler(shuffle: bool, world_size: int, drop_last: bool) -> None:
    data = list(range(37))
    for rank in range(world_size):
        ours = ResumableSampler(data, shuffle=shuffle, seed=5, rank=rank, world_size=world_size, drop_last=drop_last)
        theirs = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=5,
                                    drop_last=drop_last)
        for epoch in range(3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_every_sample_once_per_epoch_and_epochs_differ() -> None:
    sampler = ResumableSampler(range(50), seed=1)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    assert sampler.epoch == 1


def test_seed_none_follows_torch_manual_seed() -> None:
    torch.manual_seed(3)
    a = list(ResumableSampler(range(20)))
    torch.manual_seed(3)
    b = list(ResumableSampler(range(20)))
    assert a == b


@pytest.mark.parametrize("stop", [0, 1, 17, 36, 37])
def test_resume_mid_epoch_continues_the_same_order(stop: int) -> None:
    reference = ResumableSampler(range(37), seed=9)
    full = list(reference) + list(reference)

    sampler = ResumableSampler(range(37), seed=9)
    it = iter(sampler)
    consumed = [next(it) for _ in range(stop)]
    state = sampler.state_dict()
    resumed = ResumableSampler(range(37), seed=123)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert consumed + rest[: 74 - stop] == full


def test_finished_epoch_resumes_at_the_next_one() -> None:
    sampler = ResumableSampler(range(10), seed=2)
    first = list(sampler)
    resumed = ResumableSampler(range(10), seed=0)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.epoch == 0
    second = list(resumed)
    assert resumed.epoch == 1 and sorted(second) == list(range(10)) and second != first


@pytest.mark.parametrize("change, message", [
    ({"data_source": range(40)}, "dataset_len was 37 when saved but is 40"),
    ({"shuffle": False}, "shuffle was True"),
])
def test_mismatched_layout_is_refused(change: dict, message: str) -> None:
    saved = ResumableSampler(range(37), seed=1)
    next(iter(saved))
    kwargs = {"data_source": range(37), "seed": 1, **change}
    other = ResumableSampler(kwargs.pop("data_source"), **kwargs)
    with pytest.raises(StateMismatchError, match=message):
        other.load_state_dict(saved.state_dict())


def test_invalid_rank() -> None:
    with pytest.raises(ValueError, match="invalid rank 2 for world size 2"):
        ResumableSampler(range(4), rank=2, world_size=2)
