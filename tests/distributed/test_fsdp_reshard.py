"""FSDP2 (DTensor-sharded) state: saved by 2 ranks as pieces with offsets, restored on 2, 4 and 1
ranks (and by a plain single process) bitwise, each rank reading only the byte ranges it needs; saved
by 4 ranks, restored on 2; a single-process checkpoint restored into FSDP2 on 2 ranks.  Training
continues after each restore."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unbroken
from unbroken.format import Manifest

from .fsdp_worker import plain_model, train
from .harness import HERE, run_ok

WORKER = HERE / "fsdp_worker.py"


def assert_equal_files(expected: Path, restored: Path) -> None:
    a, b = load_file(str(expected)), load_file(str(restored))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def checkpoint_bytes(run: Path) -> int:
    return sum(f.stat().st_size for f in (run / "step_000000003").iterdir())


def save_on(world: int, root: Path) -> Path:
    run_ok(WORKER, ["save", root / "run", root / "out"], world, root / "logs")
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run saved by 2 FSDP2 ranks at step 3, with the full state it must restore to."""
    root = save_on(2, tmp_path_factory.mktemp("fsdp"))
    manifest = Manifest.from_json((root / "run" / "step_000000003" / "manifest.json").read_bytes(), "test")
    assert manifest.world_size == 2 and manifest.format_version == "1.2"
    weight = manifest.sharded["model/0.weight"]
    assert [s.offsets for s in weight.shards] == [(0, 0), (512, 0)] and weight.shape == (1024, 1024)
    assert [s.shape for s in manifest.sharded["model/2.weight"].shards] == [(7, 1024), (6, 1024)]
    return root


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world, mode", [(2, "direct"), (4, "direct"), (4, "broadcast"), (1, "direct")])
def test_fsdp2_checkpoint_of_2_ranks_restores_on_any_world_size(saved: Path, tmp_path: Path, world: int,
                                                                mode: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(saved / "run", run)
    args = ["restore", run, tmp_path / "out"] + (["--broadcast"] if mode == "broadcast" else [])
    ranks = run_ok(WORKER, args, world, tmp_path / "logs")
    assert "RESTORED 3 LOSS" in ranks[0].output()
    assert_equal_files(saved / "out" / "expected.safetensors", tmp_path / "out" / "restored.safetensors")
    read = [int((tmp_path / "out" / f"read{r}.txt").read_text()) for r in range(world)]
    total = checkpoint_bytes(saved / "run")
    if world == 4 and mode == "direct":  # each rank reads about its quarter, not the whole
        assert all(0 < n < 0.35 * total for n in read), (read, total)
    if mode == "broadcast":  # rank 0 reads (each byte once), the others receive
        assert read[1:] == [0] * (world - 1) and 0 < read[0] <= total, (read, total)
    assert unbroken.list_checkpoints(run, verify=True)[-1].step == 5  # the continued run saved again


@pytest.mark.timeout(180)
def test_fsdp2_checkpoint_of_4_ranks_restores_on_2(tmp_path: Path) -> None:
    saved4 = save_on(4, tmp_path / "saved4")
    manifest = Manifest.from_json((saved4 / "run" / "step_000000003" / "manifest.json").read_bytes(), "test")
    assert [s.shape for s in manifest.sharded["model/2.weight"].shards] == [(4, 1024)] * 3 + [(1, 1024)]
    ranks = run_ok(WORKER, ["restore", saved4 / "run", tmp_path / "out"], 2, tmp_path / "logs")
    assert "RESTORED 3 LOSS" in ranks[0].output()
    assert_equal_files(saved4 / "out" / "expected.safetensors", tmp_path / "out" / "restored.safetensors")
    read = [int((tmp_path / "out" / f"read{r}.txt").read_text()) for r in range(2)]
    assert all(0 < n < 0.6 * checkpoint_bytes(saved4 / "run") for n in read)  # about half each


def test_fsdp2_checkpoint_restores_into_a_plain_model_in_one_process(saved: Path) -> None:
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    unbroken.load(saved / "run", {"model": model, "optimizer": opt})
    expected = load_file(str(saved / "out" / "expected.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[f"model/{name}"]), name
    for pid, per in opt.state_dict()["state"].items():
        for key, value in per.items():
            assert torch.equal(torch.as_tensor(value), expected[f"opt/{pid}/{key}"]), (pid, key)


@pytest.mark.timeout(120)
def test_single_process_checkpoint_restores_into_fsdp2_on_2_ranks(tmp_path: Path) -> None:
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, 1, 3, rank=0)
    with unbroken.CheckpointManager(tmp_path / "run", {"model": model, "optimizer": opt}, async_save=False) as ckpt:
        ckpt.save(3)
    ranks = run_ok(WORKER, ["restore", tmp_path / "run", tmp_path / "out"], 2, tmp_path / "logs")
    assert "RESTORED 3 LOSS" in ranks[0].output()
    restored = load_file(str(tmp_path / "out" / "restored.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored[f"model/{name}"]), name
    for pid, per in opt.state_dict()["state"].items():
        for key, value in per.items():
            assert torch.equal(torch.as_tensor(value), restored[f"opt/{pid}/{key}"]), (pid, key)


@pytest.mark.timeout(120)
def test_fsdp2_on_one_rank_saves_whole_tensors_and_restores_into_dtensors(tmp_path: Path) -> None:
    saved1 = save_on(1, tmp_path / "saved1")
    manifest = Manifest.from_json((saved1 / "run" / "step_000000003" / "manifest.json").read_bytes(), "test")
    assert manifest.rank_state is None and not manifest.sharded  # a plain single-process checkpoint
    ranks = run_ok(WORKER, ["restore", saved1 / "run", tmp_path / "out"], 1, tmp_path / "logs")
    assert "RESTORED 3 LOSS" in ranks[0].output()
    assert_equal_files(saved1 / "out" / "expected.safetensors", tmp_path / "out" / "restored.safetensors")
