"""DDP at 2 and 4 ranks: SIGKILL every rank mid-run (saves in flight), relaunch, resume: parameters,
buffers, optimizer state, each rank's data order and RNG streams are bitwise those of an uninterrupted
run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unbroken import list_checkpoints, read_state_dict
from unbroken.format import Manifest
from unbroken.manager.event_log_format import read_events

from .harness import HERE, kill_all, launch, run_ok, wait_for

WORKER = HERE / "ddp_worker.py"
STEPS = 12


def data_order(out: Path, rank: int) -> dict[int, str]:
    """Step -> sample indices; a resumed run's lines replace those of the steps it redid."""
    order: dict[int, str] = {}
    for line in (out / f"data{rank}.txt").read_text().splitlines():
        step, indices = line.split(" ", 1)
        order[int(step)] = indices
    return order


def assert_same_run(reference: Path, resumed: Path, world: int) -> None:
    ref, got = load_file(str(reference / "final.safetensors")), load_file(str(resumed / "final.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    for rank in range(world):
        assert data_order(reference, rank) == data_order(resumed, rank), f"rank {rank} saw other samples"
        assert (reference / f"rng{rank}.txt").read_text() == (resumed / f"rng{rank}.txt").read_text()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_sigkill_every_rank_mid_run_then_resume_is_bitwise_exact(tmp_path: Path, world: int) -> None:
    # At 2 ranks with a BatchNorm, whose running statistics differ between the ranks after each step.
    model = ["--batchnorm"] if world == 2 else []
    run_ok(WORKER, [tmp_path / "ref_run", tmp_path / "ref", STEPS, *model], world, tmp_path / "logs_ref")
    events = read_events(tmp_path / "ref_run")  # the run's log: written by rank 0 alone
    assert {e["rank"] for e in events} == {0} and "save" in {e["event"] for e in events}
    assert [e["world_size"] for e in events if e["event"] == "start"] == [world]

    kill_at = random.Random(world).randint(6, 9)
    ranks = launch(WORKER, [tmp_path / "run", tmp_path / "out", STEPS, *model], world, tmp_path / "logs_crash")
    wait_for(ranks, f"STEP {kill_at}\n", timeout=120)
    kill_all(ranks)  # SIGKILL: an async save may be half-written
    assert all(r.proc.returncode == -9 for r in ranks)

    resumed = run_ok(WORKER, [tmp_path / "run", tmp_path / "out", STEPS, *model], world, tmp_path / "logs_resume")
    start = int(resumed[0].output().split("START ", 1)[1].split()[0])
    assert 2 <= start <= kill_at, resumed[0].output()
    assert_same_run(tmp_path / "ref", tmp_path / "out", world)
    records = list_checkpoints(tmp_path / "run", verify=True)
    assert records and all(r.valid for r in records)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".staging")]


@pytest.mark.timeout(120)
def test_a_corrupt_byte_only_one_rank_reads_makes_every_rank_fall_back(tmp_path: Path) -> None:
    """Rank 1 alone reads its own RNG streams: it finds the damage, and both ranks resume from the
    previous checkpoint together (never from two different steps)."""
    run = tmp_path / "run"
    run_ok(WORKER, [run, tmp_path / "out", 4, "--sync"], 2, tmp_path / "logs_a")
    newest = run / "step_000000004"
    manifest = Manifest.from_json((newest / "manifest.json").read_bytes(), "test")
    entry = manifest.tensors["unbroken.rank00001/unbroken.rng/torch"]
    data = bytearray((newest / entry.file).read_bytes())
    data[entry.begin + 100] ^= 0x10
    (newest / entry.file).write_bytes(bytes(data))
    ranks = run_ok(WORKER, [run, tmp_path / "out", 6], 2, tmp_path / "logs_b")
    for r in ranks:
        assert "START 2" in r.output(), r.output()
        assert "skipping checkpoint" in r.output() and "rank 1" in r.output() and "checksum mismatch" in r.output()
    # Rank 0 quarantined it once every rank was done with it, so step 4 could be saved again.
    assert len(list(run.glob("corrupt-step_000000004-*"))) == 1
    assert [r.step for r in list_checkpoints(run, verify=True) if r.valid][-1] == 6


@pytest.mark.timeout(120)
def test_a_checkpoint_holds_rank_0s_buffers_which_ddp_goes_on_with(tmp_path: Path) -> None:
    """After a step each rank's BatchNorm holds its own batch's statistics, until DDP's next forward
    broadcasts rank 0's: the checkpoint must hold rank 0's (parameters are identical anyway)."""
    run_ok(WORKER, [tmp_path / "run", tmp_path / "out", 4, "--sync", "--batchnorm"], 2, tmp_path / "logs")
    final = load_file(str(tmp_path / "out" / "final.safetensors"))  # rank 0's, as of the last checkpoint
    saved = read_state_dict(tmp_path / "run", "model")
    assert "1.running_mean" in saved
    for name, tensor in saved.items():
        assert torch.equal(tensor, final[f"model/{name}"]), name
