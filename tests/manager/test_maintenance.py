"""unbroken.prune and unbroken.copy_checkpoints on local runs (URLs: tests/manager/test_object_storage.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unbroken
from unbroken.cli.main import main as cli_main


def make_run(run: Path, steps: int = 5) -> None:
    state = {"w": torch.zeros(8), "epoch": 0}
    ckpt = unbroken.CheckpointManager(run, state, every_steps=1, async_save=False)
    for step in range(1, steps + 1):
        state["w"].fill_(step)
        ckpt.step(step, metrics={"loss": abs(3 - step)})
    ckpt.close()


def steps(run: Path) -> list[int]:
    return [r.step for r in unbroken.list_checkpoints(run) if r.valid]


def test_prune_keeps_what_the_rules_keep_and_always_the_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    dry = unbroken.prune(run, keep_best=1, best_metric="loss", dry_run=True)
    assert [r.step for r in dry.deleted] == [1, 2, 4] and steps(run) == [1, 2, 3, 4, 5]
    result = unbroken.prune(run, keep_best=1, best_metric="loss")
    assert [r.step for r in result.deleted] == [1, 2, 4] and not result.failed
    assert steps(run) == [3, 5]  # the best (loss 0 at step 3) and the newest


def test_prune_deletes_invalid_checkpoints_only_when_asked(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, 3)
    (run / "step_000000002" / "manifest.json").write_bytes(b"")
    assert unbroken.prune(run, keep_last=5).deleted == []
    assert (run / "step_000000002").exists()
    result = unbroken.prune(run, invalid=True)
    assert [r.step for r in result.deleted] == [2] and not (run / "step_000000002").exists()


def test_prune_refuses_a_run_a_manager_is_writing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, 2)
    live = unbroken.CheckpointManager(run, {"w": torch.zeros(8), "epoch": 0})
    try:
        with pytest.raises(unbroken.RunLockedError):
            unbroken.prune(run, keep_last=1)
    finally:
        live.close()
    assert [r.step for r in unbroken.prune(run, keep_last=1).deleted] == [1]


def test_prune_without_a_rule_is_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "run", 1)
    with pytest.raises(ValueError, match="needs a rule"):
        unbroken.prune(tmp_path / "run")
    with pytest.raises(ValueError, match="best_metric"):
        unbroken.prune(tmp_path / "run", keep_best=1)


def test_copy_checkpoints_is_verified_and_idempotent(tmp_path: Path) -> None:
    run, copy = tmp_path / "run", tmp_path / "copy"
    make_run(run, 3)
    assert [r.name for r in unbroken.copy_checkpoints(run, copy, latest=True)] == ["step_000000003"]
    results = unbroken.copy_checkpoints(run, copy)
    assert [(r.name, r.copied) for r in results] == [("step_000000001", True), ("step_000000002", True),
                                                     ("step_000000003", False)]
    assert [r.step for r in unbroken.list_checkpoints(copy, verify=True)] == [1, 2, 3]
    state = {"w": torch.zeros(8), "epoch": 0}
    unbroken.load(copy / "step_000000002", state, rng=False)
    assert torch.equal(state["w"], torch.full((8,), 2.0))


def test_a_corrupt_source_is_not_copied(tmp_path: Path) -> None:
    run, copy = tmp_path / "run", tmp_path / "copy"
    make_run(run, 1)
    data = run / "step_000000001" / "rank00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(unbroken.CorruptCheckpointError):
        unbroken.copy_checkpoints(run, copy, step=1)
    assert steps(copy) == []


def test_cli_prune_and_cp_on_local_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    make_run(run, 4)
    assert cli_main(["cp", str(run), str(tmp_path / "copy"), "--step", "2", "--no-progress"]) == 0
    assert "copied   step_000000002" in capsys.readouterr().out
    assert cli_main(["prune", str(run), "--keep-last", "2"]) == 0
    out = capsys.readouterr().out
    assert "deleted      step 1" in out and "kept 2 checkpoint(s): [3, 4]" in out
    assert cli_main(["prune", str(run)]) == 2
    assert "needs a rule" in capsys.readouterr().err
