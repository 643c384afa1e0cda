"""Every reader of one checkpoint (``read_state_dict``, ``export``, ``diff``, ``unbroken show``) finds
the checkpoint a path means by one rule, and says the same of the same mistake
(unbroken.checkpoint.target).  Checkpoints are written in-process with ``unbroken.save``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import unbroken
from unbroken.cli.main import main
from unbroken.storage import step_name


def _run(root: Path, steps: tuple[int, ...] = (1, 2, 3)) -> Path:
    for step in steps:
        unbroken.save(root / step_name(step), {"model": {"w": torch.full((4,), float(step))}}, step=step, rng=False)
    return root


def _readers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Callable[[Path, int | None], str]]:
    """Each reader of one checkpoint, as a function of (path, step) giving its error message."""
    other = _run(tmp_path / "other", (1,))

    def library(call: Callable[[Path, int | None], Any]) -> Callable[[Path, int | None], str]:
        def said(path: Path, step: int | None) -> str:
            with pytest.raises((unbroken.CheckpointNotFoundError, unbroken.CorruptCheckpointError)) as caught:
                call(path, step)
            return str(caught.value)
        return said

    def show(path: Path, step: int | None) -> str:
        code = main(["show", str(path), *(["--step", str(step)] if step is not None else [])])
        out, err = capsys.readouterr()
        assert code in (1, 2) and out == "" and err.startswith("error: ")
        return err[len("error: "):].rstrip("\n")

    def diff(path: Path, step: int | None) -> str:
        code = main(["diff", str(path), str(other), *(["--step-a", str(step)] if step is not None else [])])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.startswith("unbroken diff: error: ")
        return err[len("unbroken diff: error: "):].rstrip("\n")

    return {
        "read_state_dict": library(lambda path, step: unbroken.read_state_dict(path, step=step)),
        "export": library(lambda path, step: unbroken.export(path, tmp_path / "out.safetensors", step=step)),
        "diff": library(lambda path, step: unbroken.diff(path, other, step_a=step)),
        "unbroken show": show,
        "unbroken diff": diff,
    }


def test_every_reader_of_one_checkpoint_says_the_same_of_the_same_mistake(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    expected = {
        (tmp_path / "nonexistent", None): f"{tmp_path / 'nonexistent'}: no such path",
        (tmp_path / "file", None): f"{tmp_path / 'file'}: not a directory (expected a run directory or a "
                                   "checkpoint directory)",
        (tmp_path / "empty", None): f"{tmp_path / 'empty'}: neither a checkpoint (no manifest.json) nor a run "
                                    "directory with checkpoints (no step_* directories)",
        (run, 7): f"{run}: no step 7 (steps there: 1, 2, 3)",
        (run / step_name(2), 3): f"{run / step_name(2)} is the checkpoint of step 2, not of step 3; to choose a "
                                 "step, give the run directory that holds it",
    }
    for name, reader in _readers(tmp_path, capsys).items():
        for (path, step), message in expected.items():
            assert reader(path, step) == message, (name, path, step)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_run_stands_for_its_newest_valid_checkpoint_in_every_reader(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run")
    (run / step_name(3) / "manifest.json").write_text("{")  # the newest is damaged: step 2 stands for the run
    with pytest.warns(unbroken.CheckpointSkippedWarning, match=f"{step_name(3)}: .*manifest"):
        assert unbroken.read_state_dict(run)["w"].tolist() == [2.0] * 4
    with pytest.warns(unbroken.CheckpointSkippedWarning, match=step_name(3)):
        assert unbroken.diff(run, run / step_name(2)).identical
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ls lists the damaged one; show names the one it shows
        assert main(["show", str(run)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and f"checkpoint {run / step_name(2)}" in out
    with pytest.raises(unbroken.CorruptCheckpointError, match="manifest"):
        unbroken.read_state_dict(run, step=3)  # a named step never falls back


def test_a_run_without_one_valid_checkpoint_names_each_problem(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run", (1, 2))
    for step in (1, 2):
        (run / step_name(step) / "manifest.json").write_text("{")
    for name, reader in _readers(tmp_path, capsys).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", unbroken.CheckpointSkippedWarning)
            said = reader(run, None)
        assert said.startswith(f"{run}: no valid checkpoint (step 2: "), name
        assert "; step 1: " in said, name
