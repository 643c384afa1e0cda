"""A DDP checkpoint saved on N ranks resumes on M != N (4->2, 2->4, 2->1, 1->2): the replicated model
and optimizer are restored bitwise; the interrupted epoch continues with every sample exactly once
across both runs (the rest of the global order is re-split); rank r < N continues saved rank r's
RNG streams, a new rank gets streams of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .harness import HERE, run_ok

WORKER = HERE / "ddp_worker.py"
DATASET = 40
MID_EPOCH = {1: 3, 2: 3, 4: 1}  # steps: mid-way through the first epoch on that many ranks


def samples(out: Path, world: int) -> list[int]:
    return [int(i) for r in range(world) for line in (out / f"data{r}.txt").read_text().splitlines()
            for i in line.split()[1:]]


@pytest.mark.timeout(180)
# 2 -> 4 in broadcast mode is slow (-m slow): broadcast reads are also proven by FSDP2 (test_fsdp_reshard,
# test_object_storage_ranks) and by "spread", which broadcasts every replicated tensor.
@pytest.mark.parametrize("saved_world, world, mode", [
    (4, 2, "direct"), pytest.param(2, 4, "broadcast", marks=pytest.mark.slow), (4, 2, "spread"),
    (2, 1, "direct"), (1, 2, "direct")])
def test_ddp_checkpoint_resumes_on_another_world_size(tmp_path: Path, saved_world: int, world: int,
                                                      mode: str) -> None:
    run, before, after = tmp_path / "run", tmp_path / "before", tmp_path / "after"
    run_ok(WORKER, [run, before, MID_EPOCH[saved_world]], saved_world, tmp_path / "logs_a")
    ranks = run_ok(WORKER, [run, after, 1000, "--epochs", "1", "--restore-mode", mode], world, tmp_path / "logs_b")
    assert f"START {MID_EPOCH[saved_world]}" in ranks[0].output()

    saved, restored = load_file(str(before / "final.safetensors")), load_file(str(after / "restored.safetensors"))
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)

    assert sorted(samples(before, saved_world) + samples(after, world)) == list(range(DATASET))

    saved_streams = [(before / f"rngstate_end{r}.txt").read_text() for r in range(saved_world)]
    resumed_streams = [(after / f"rngstate{r}.txt").read_text() for r in range(world)]
    for rank, stream in enumerate(resumed_streams):
        if rank < saved_world:
            assert stream == saved_streams[rank]
        else:
            assert stream not in saved_streams
    assert len(set(resumed_streams)) == world
