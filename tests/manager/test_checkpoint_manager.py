"""CheckpointManager: schedule, explicit saves, close, restore and its fallbacks, bad inputs."""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import unbroken
from tests import helpers
from tests.helpers import FakeClock, SyncManager
from tests.mounts import bind_mount, remount, tmpfs
from unbroken import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointSkippedWarning,
    StateMismatchError,
    StorageError,
    UnserializableStateError,
)
from unbroken.manager import checkpoint_manager, options
from unbroken.manager.schedule import SaveSchedule

make_state = partial(helpers.make_state, step_lr=True, epoch=0,
                     optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))




def train_step(state: dict) -> float:
    x = torch.randn(8, 4)
    loss = state["model"](x).pow(2).mean()
    state["optimizer"].zero_grad()
    loss.backward()
    state["optimizer"].step()
    state["scheduler"].step()
    return loss.item()


def params(state: dict) -> list[torch.Tensor]:
    return [p.detach().clone() for p in state["model"].parameters()]


def steps_on_disk(run: Path) -> list[int]:
    return [r.step for r in unbroken.list_checkpoints(run)]


def test_fresh_directory_is_created_and_restore_returns_zero(tmp_path: Path) -> None:
    run = tmp_path / "a" / "b" / "run"
    ckpt = SyncManager(run, make_state())
    assert run.is_dir()
    assert ckpt.restore() == 0
    assert ckpt.list() == []


def test_every_steps_schedule(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=3, save_on_close=False)
    saved = [ckpt.step(s) for s in range(1, 10)]
    assert saved == [False, False, True, False, False, True, False, False, True]
    assert steps_on_disk(tmp_path) == [3, 6, 9]


def test_every_minutes_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(options, "SaveSchedule", partial(SaveSchedule, clock=clock))
    ckpt = SyncManager(tmp_path, make_state(), every_minutes=0.002, save_on_close=False)  # 120 ms
    clock.advance(0.119)
    assert ckpt.step(1) is False
    clock.advance(0.001)
    assert ckpt.step(2) is True
    assert ckpt.step(3) is False
    assert steps_on_disk(tmp_path) == [2]


def test_explicit_save_and_refusal_to_overwrite(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path, make_state(), save_on_close=False)
    with pytest.raises(ValueError, match="needs a step"):
        ckpt.save()
    ckpt.step(5)
    record = ckpt.save(metrics={"val_loss": 0.25})
    assert record.step == 5 and record.metrics == {"val_loss": 0.25} and record.size > 0
    with pytest.raises(CheckpointExistsError, match="step 5 already exists"):
        ckpt.save()


def test_close_saves_final_step_once(tmp_path: Path) -> None:
    with SyncManager(tmp_path, make_state(), every_steps=4) as ckpt:
        for s in range(1, 7):
            ckpt.step(s)
    assert steps_on_disk(tmp_path) == [4, 6]
    ckpt.close()  # idempotent
    assert steps_on_disk(tmp_path) == [4, 6]


def test_no_final_save_after_an_exception_or_when_disabled(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with SyncManager(tmp_path / "a", make_state()) as ckpt:
            ckpt.step(1)
            raise RuntimeError("boom")
    assert steps_on_disk(tmp_path / "a") == []
    ckpt = SyncManager(tmp_path / "b", make_state(), save_on_close=False)
    ckpt.step(1)
    ckpt.close()
    assert steps_on_disk(tmp_path / "b") == []


def test_step_validation_and_closed_manager(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path, make_state(), save_on_close=False)
    ckpt.step(5)
    with pytest.raises(ValueError, match="backwards"):
        ckpt.step(4)
    with pytest.raises(ValueError, match="non-negative integer"):
        ckpt.step(-1)
    ckpt.close()
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.step(6)


@pytest.mark.parametrize("kwargs, message", [
    ({"every_steps": 0}, "every_steps"),
    ({"every_minutes": -1}, "every_minutes"),
    ({"keep_last": 0}, "keep_last"),
    ({"keep_best": 2}, "best_metric"),
    ({"best_metric": "loss"}, "keep_best"),
    ({"keep_best": 1, "best_metric": "loss", "best_mode": "lowest"}, "best_mode"),
    ({"keep_every": 2.5}, "keep_every"),
])
def test_invalid_settings_are_refused_clearly(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyncManager(tmp_path, make_state(), **kwargs)


def test_reserved_and_bad_state_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        SyncManager(tmp_path, {"unbroken.rng": 1})
    with pytest.raises(TypeError, match="non-empty strings"):
        SyncManager(tmp_path, {3: 1})


def test_resume_continues_bit_exactly(tmp_path: Path) -> None:
    reference = make_state()
    ref_losses = [train_step(reference) for _ in range(10)]

    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=4, save_on_close=False)
    for s in range(1, 7):
        train_step(state)
        state["epoch"] = s // 3
        ckpt.step(s)
    # "crash" after step 6; the newest checkpoint is step 4
    resumed = make_state(seed=123)  # different init: everything must come from the checkpoint
    ckpt2 = SyncManager(tmp_path, resumed)
    start = ckpt2.restore()
    assert start == 4 and resumed["epoch"] == 1
    losses = [train_step(resumed) for _ in range(start, 10)]
    assert [float.hex(v) for v in losses] == [float.hex(v) for v in ref_losses[start:]]
    for a, b in zip(params(reference), params(resumed)):
        assert torch.equal(a, b)
    assert resumed["scheduler"].state_dict() == reference["scheduler"].state_dict()


def _corrupt_newest_tensor_file(run: Path) -> Path:
    newest = sorted(run.glob("step_*"))[-1]
    data = newest / "rank00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x10
    data.write_bytes(bytes(raw))
    return newest


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=2, save_on_close=False)
    for s in range(1, 5):
        train_step(state)
        ckpt.step(s)
    _corrupt_newest_tensor_file(tmp_path)
    fresh = make_state(seed=9)
    with pytest.warns(CheckpointSkippedWarning, match=r"step_000000004.*checksum mismatch"):
        assert SyncManager(tmp_path, fresh).restore() == 2
    records = unbroken.list_checkpoints(tmp_path, verify=True, quarantined=True)
    assert [(r.step, r.valid, r.quarantined) for r in records] == [(2, True, False), (4, False, True)]


@pytest.mark.parametrize("damage", ["truncate", "empty_manifest", "no_manifest", "delete_data"])
def test_broken_newest_checkpoint_is_skipped(tmp_path: Path, damage: str) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=1, save_on_close=False)
    for s in (1, 2):
        train_step(state)
        ckpt.step(s)
    newest = tmp_path / "step_000000002"
    if damage == "truncate":
        data = newest / "rank00000.safetensors"
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "empty_manifest":
        (newest / "manifest.json").write_bytes(b"")
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "rank00000.safetensors").unlink()
    with pytest.warns(CheckpointSkippedWarning, match="step_000000002"):
        assert SyncManager(tmp_path, make_state(seed=5)).restore() == 1


def test_all_checkpoints_broken_starts_fresh_with_warnings(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=1, save_on_close=False)
    ckpt.step(1)
    _corrupt_newest_tensor_file(tmp_path)
    before = params(state)
    with pytest.warns(CheckpointSkippedWarning):
        assert SyncManager(tmp_path, state).restore() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, params(state)))


def test_abandoned_staging_is_cleaned_and_never_listed(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=1, save_on_close=False)
    ckpt.step(1)
    staging = tmp_path / ".staging-step_000000002-deadbeef0000"
    staging.mkdir()
    (staging / "rank00000.safetensors").write_bytes(b"partial")
    assert steps_on_disk(tmp_path) == [1]
    assert SyncManager(tmp_path, make_state()).restore() == 1
    assert not staging.exists()


def test_restore_specific_step_or_path(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=1, save_on_close=False)
    snapshots = {}
    for s in (1, 2, 3):
        train_step(state)
        ckpt.step(s)
        snapshots[s] = params(state)
    fresh = make_state(seed=3)
    assert SyncManager(tmp_path, fresh).restore(step=2) == 2
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], params(fresh)))
    assert SyncManager(tmp_path, fresh).restore(path=tmp_path / "step_000000001") == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], params(fresh)))
    with pytest.raises(CheckpointNotFoundError, match=r"step 7.*available steps: \[1, 2, 3\]"):
        SyncManager(tmp_path, fresh).restore(step=7)
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint"):
        SyncManager(tmp_path, fresh).restore(path=tmp_path / "missing")


def test_mismatched_model_raises_once_and_does_not_fall_back(tmp_path: Path) -> None:
    ckpt = SyncManager(tmp_path, make_state(), every_steps=1, save_on_close=False)
    ckpt.step(1)
    ckpt.step(2)
    other = make_state(sizes=(4, 16, 1))
    before = params(other)
    with pytest.raises(StateMismatchError) as info:
        SyncManager(tmp_path, other).restore()
    message = str(info.value)
    assert "'0.weight' has shape [8, 4] in the checkpoint but [16, 4]" in message
    assert "param groups" not in message  # same structure: only shapes differ
    assert "strict=False" in message
    assert all(torch.equal(a, b) for a, b in zip(before, params(other)))


def test_missing_and_unexpected_entries_are_listed(tmp_path: Path) -> None:
    state = make_state()
    SyncManager(tmp_path, state, every_steps=1, save_on_close=False).step(1)
    live = make_state()
    del live["scheduler"]
    live["extra"] = 3
    with pytest.raises(StateMismatchError) as info:
        SyncManager(tmp_path, live).restore()
    assert "'extra': in the live state but not in the checkpoint" in str(info.value)
    assert "'scheduler': in the checkpoint but not in the live state" in str(info.value)
    with pytest.warns(UserWarning, match="strict=False"):
        assert SyncManager(tmp_path, live, strict=False).restore() == 1
    assert live["extra"] == 3


def test_unserializable_value_fails_the_save_and_loses_nothing(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=1, save_on_close=False)
    ckpt.step(1)
    state["config"] = {"activation": torch.relu}
    with pytest.raises(UnserializableStateError, match=r"'config/activation'.*Fix"):
        ckpt.step(2)
    assert steps_on_disk(tmp_path) == [1]
    assert [p.name for p in tmp_path.iterdir() if p.name not in (".lock", "events.jsonl")] == ["step_000000001"]
    assert unbroken.verify(tmp_path / "step_000000001").step == 1


def test_read_only_directory_is_refused_at_construction(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(StorageError, match="read-only filesystem.*Fix"):
            SyncManager(ro / "run", make_state())
        with pytest.raises(StorageError, match="read-only"):
            SyncManager(ro, make_state())


def test_directory_turning_read_only_fails_the_save_not_earlier_checkpoints(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mnt:
        state = make_state()
        ckpt = SyncManager(mnt, state, every_steps=1, save_on_close=False)
        ckpt.step(1)
        remount(mnt, read_only=True)
        try:
            with pytest.raises(StorageError, match="saving step 2.*Earlier checkpoints are intact"):
                ckpt.step(2)
        finally:
            remount(mnt, read_only=False)
        assert steps_on_disk(mnt) == [1]
        assert unbroken.verify(mnt / "step_000000001").valid
        assert ckpt.step(3) is True  # training goes on once the directory is writable again


def test_full_disk_fails_the_save_and_leaves_no_debris(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="1m") as small:
        state = {"w": nn.Linear(8, 8)}
        ckpt = SyncManager(small, state, every_steps=1, save_on_close=False)
        ckpt.step(1)
        state["big"] = nn.Linear(1024, 512)  # 2 MB of weights on a 1 MB filesystem
        with pytest.raises(StorageError, match="No space left"):
            ckpt.step(2)
        assert sorted(p.name for p in small.iterdir() if p.name not in (".lock", "events.jsonl")) == ["step_000000001"]
        assert unbroken.verify(small / "step_000000001").valid


def test_failed_retention_delete_is_a_warning(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=1, keep_last=1, save_on_close=False)
    ckpt.step(1)
    with bind_mount(tmp_path / "step_000000001"):
        with pytest.warns(RuntimeWarning, match="could not delete checkpoint step 1"):
            assert ckpt.step(2) is True
        assert steps_on_disk(tmp_path) == [1, 2]
    ckpt.step(3)
    assert steps_on_disk(tmp_path) == [3]


def test_run_directory_that_is_a_checkpoint_is_refused(tmp_path: Path) -> None:
    unbroken.save(tmp_path / "ck", make_state())
    with pytest.raises(ValueError, match="single checkpoint"):
        SyncManager(tmp_path / "ck", make_state())


def test_warning_free_normal_run(tmp_path: Path) -> None:
    state = make_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with SyncManager(tmp_path, state, every_steps=2, keep_last=2) as ckpt:
            start = ckpt.restore()
            for s in range(start, 6):
                train_step(state)
                ckpt.step(s + 1, metrics={"loss": 1.0 / (s + 1)})
    assert steps_on_disk(tmp_path) == [4, 6]


def test_step_over_an_existing_checkpoint_warns_and_keeps_it(tmp_path: Path) -> None:
    state = make_state()
    ckpt = SyncManager(tmp_path, state, every_steps=2, save_on_close=False)
    for s in range(1, 5):
        train_step(state)
        ckpt.step(s)
    original = (tmp_path / "step_000000004" / "manifest.json").read_bytes()
    again = SyncManager(tmp_path, make_state(seed=1), every_steps=2, save_on_close=False)
    assert again.restore(step=2) == 2
    again.step(3)
    with pytest.warns(RuntimeWarning, match="step 4 already exists"):
        assert again.step(4) is False
    assert (tmp_path / "step_000000004" / "manifest.json").read_bytes() == original


class Fragile:
    """A user object whose load_state_dict fails on a value it cannot take."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state["value"] < 0:
            raise KeyError("negative values are not allowed")
        self.value = state["value"]


def test_a_load_that_fails_midway_falls_back_or_raises_never_starts_fresh(tmp_path: Path) -> None:
    state = {"model": make_state()["model"], "zz": Fragile()}
    ckpt = SyncManager(tmp_path, state, every_steps=1, save_on_close=False)
    ckpt.step(1)
    state["zz"].value = -1
    ckpt.step(2)
    live = {"model": make_state(seed=4)["model"], "zz": Fragile()}
    with pytest.warns(CheckpointSkippedWarning, match=r"'zz' could not be loaded.*already overwritten: \['model'\]"):
        assert SyncManager(tmp_path, live).restore() == 1
    # Every byte verified; a live object refused it: the checkpoint is not damaged, so not quarantined.
    assert (tmp_path / "step_000000002").is_dir() and not list(tmp_path.glob("corrupt-*"))
    (tmp_path / "step_000000001" / "manifest.json").unlink()
    with pytest.warns(CheckpointSkippedWarning):
        with pytest.raises(unbroken.PartialRestoreError, match="already overwritten"):
            SyncManager(tmp_path, {"model": make_state(seed=4)["model"], "zz": Fragile()}).restore()


def test_a_restore_logs_its_step_size_and_duration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A long restore is not silent: one line with the step, the checkpoint's bytes and the seconds."""
    with SyncManager(tmp_path, make_state(), save_on_close=False) as ckpt:
        record = ckpt.save(4, wait=True)
    assert record is not None
    clock = FakeClock()
    monkeypatch.setattr(options, "SaveSchedule", partial(SaveSchedule, clock=clock))
    real = checkpoint_manager.restore_newest

    def slow_restore(*args: object, **kwargs: object) -> object:
        clock.advance(19.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_manager, "restore_newest", slow_restore)
    with caplog.at_level(logging.INFO, logger="unbroken"), SyncManager(tmp_path, make_state(),
                                                                       save_on_close=False) as ckpt:
        assert ckpt.restore() == 4
    lines = [r.getMessage() for r in caplog.records if "resumed from step" in r.getMessage()]
    assert lines == [f"resumed from step 4 ({ckpt.storage.url}): a checkpoint of {record.size} bytes, "
                     "restored in 19.0 s"]
