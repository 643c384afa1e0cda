"""unbroken.save / unbroken.load: one checkpoint without a manager."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import unbroken
from tests.helpers import SyncManager
from unbroken import CheckpointExistsError, CheckpointNotFoundError


def test_save_load_round_trip_with_metadata(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    record = unbroken.save(tmp_path / "ck", {"model": model, "epoch": 7}, step=12, metrics={"loss": 0.5},
                           metadata={"args": {"lr": 0.1}})
    assert (record.step, record.metrics) == (12, {"loss": 0.5})
    fresh = {"model": nn.Linear(3, 2), "epoch": 0}
    loaded = unbroken.load(tmp_path / "ck", fresh)
    assert loaded.step == 12 and fresh["epoch"] == 7
    assert torch.equal(fresh["model"].weight, model.weight)
    info = unbroken.read_info(tmp_path / "ck")
    assert info.manifest.metadata == {"args": {"lr": 0.1}}
    assert info.state["model"][1]["weight"].shape == (2, 3)


def test_save_never_overwrites(tmp_path: Path) -> None:
    unbroken.save(tmp_path / "ck", {"x": 1})
    with pytest.raises(CheckpointExistsError, match="never overwritten"):
        unbroken.save(tmp_path / "ck", {"x": 2})
    state = {"x": 0}
    unbroken.load(tmp_path / "ck", state)
    assert state["x"] == 1


def test_a_path_named_for_a_step_must_hold_that_step(tmp_path: Path) -> None:
    """A run resumes from step_N by its name: saving another step there would plant a checkpoint that
    the run must treat as corrupt."""
    with pytest.raises(ValueError, match=r"named for step 5 but step=0; pass step=5"):
        unbroken.save(tmp_path / "run" / "step_000000005", {"x": 1})
    assert not (tmp_path / "run" / "step_000000005").exists()
    assert unbroken.save(tmp_path / "run" / "step_000000005", {"x": 1}, step=5).step == 5


def test_load_from_a_run_directory_uses_the_newest_valid(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path, {"x": 1}, every_steps=1, save_on_close=False)
    ckpt.step(1)
    ckpt.state["x"] = 2
    ckpt.step(2)
    state = {"x": 0}
    assert unbroken.load(tmp_path, state).step == 2 and state["x"] == 2


def test_load_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint or run directory"):
        unbroken.load(tmp_path / "nope", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no valid checkpoint"):
        unbroken.load(tmp_path / "empty", {})


def test_metrics_must_be_numbers(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="metrics must map"):
        unbroken.save(tmp_path / "ck", {"x": 1}, metrics={"loss": "low"})
    assert not (tmp_path / "ck").exists()
    record = unbroken.save(tmp_path / "ck2", {"x": 1}, metrics={"loss": torch.tensor(0.25)})
    assert record.metrics == {"loss": 0.25}


def test_a_missing_metric_may_be_none(tmp_path: Path) -> None:
    """The README: missing metrics are fine.  None is stored as null and read back as None."""
    record = unbroken.save(tmp_path / "ck", {"x": 1}, metrics={"loss": None, "acc": 0.5})
    assert record.metrics == {"loss": None, "acc": 0.5}
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["metrics"] == {"loss": None, "acc": 0.5}
    assert unbroken.read_info(tmp_path / "ck").metrics == {"loss": None, "acc": 0.5}
