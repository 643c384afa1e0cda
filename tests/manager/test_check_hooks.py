"""The environment a CheckpointManager honours for ``unbroken check`` (unbroken.manager.check_hooks),
in-process: the run directory override, the check log, the clean end after N steps.  The kill
(UNBROKEN_KILL_AT) is exercised by tests/cli/test_check.py, in real subprocesses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from unbroken import CheckpointManager


def _state() -> dict:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def _train(state: dict, ckpt: CheckpointManager, start: int, stop: int) -> None:
    for step in range(start, stop):
        loss = state["model"](torch.randn(4, 3)).pow(2).mean()
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()
        ckpt.step(step + 1, metrics={"loss": loss.item(), "lr": 0.1})


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unbroken_run_dir_replaces_the_directory_given_in_code_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("UNBROKEN_RUN_DIR", str(tmp_path / "elsewhere"))
    with caplog.at_level(logging.WARNING, logger="unbroken"):
        with CheckpointManager(tmp_path / "in_code", _state(), every_steps=1) as ckpt:
            ckpt.step(1)
    assert (tmp_path / "elsewhere" / "step_000000001").is_dir()
    assert not (tmp_path / "in_code").exists()
    assert any("replaced by" in r.getMessage() and "UNBROKEN_RUN_DIR" in r.getMessage() for r in caplog.records)


def test_the_check_log_records_restores_metrics_saves_and_a_reseed_after_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "check.jsonl"
    monkeypatch.setenv("UNBROKEN_CHECK_LOG", str(log))
    state = _state()
    with CheckpointManager(tmp_path / "run", state, every_steps=2, async_save=False) as ckpt:
        assert ckpt.restore() == 0
        torch.manual_seed(1)  # after a restore that restored nothing: a fresh start seeding, not recorded
        _train(state, ckpt, 0, 2)
    first = _records(log)
    assert [(r["event"], r["step"]) for r in first] == [("restore", 0), ("step", 1), ("save", 2), ("step", 2)]
    assert first[1]["metrics"] == {"loss": pytest.approx(first[1]["metrics"]["loss"]), "lr": 0.1}
    assert first[2]["grads_pending"] is False and set(first[2]["rng"]) >= {"python", "numpy", "torch"}
    assert first[2]["rng"] == first[3]["rng"]  # the save and the step: one moment of the RNG streams

    log.unlink()
    state = _state()
    with CheckpointManager(tmp_path / "run", state, every_steps=2, async_save=False) as ckpt:
        assert ckpt.restore() == 2
        torch.manual_seed(42)  # the defect: it replaces the RNG streams restore() put back
        _train(state, ckpt, 2, 3)
        torch.manual_seed(43)  # after the first step: another epoch's seed, not the resume's business
    second = _records(log)
    assert [r["event"] for r in second] == ["restore", "seed", "step", "save"]  # the save: close() at step 3
    assert second[0]["rng"] == first[3]["rng"]  # restored exactly as saved
    seed = second[1]
    assert seed["call"] == "torch.manual_seed(42)" and seed["after_restore"] == 2
    assert seed["where"].endswith("(test_the_check_log_records_restores_metrics_saves_and_a_reseed_after_restore)")
    assert "test_check_hooks.py:" in seed["where"]
    assert torch.manual_seed.__module__ == "torch.random"  # the watch is gone after the first step


def test_unbroken_check_steps_ends_the_process_cleanly_after_that_step_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNBROKEN_CHECK_STEPS", "3")
    state = _state()
    ckpt = CheckpointManager(tmp_path, state, every_steps=100)
    with pytest.raises(SystemExit) as ended, ckpt:
        _train(state, ckpt, 0, 10)
    assert ended.value.code == 0
    assert [r.step for r in ckpt.list()] == [3]


def test_a_bad_check_variable_is_refused_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNBROKEN_KILL_AT", "ten")
    with pytest.raises(ValueError, match="UNBROKEN_KILL_AT='ten': expected a non-negative integer"):
        CheckpointManager(tmp_path, _state())
