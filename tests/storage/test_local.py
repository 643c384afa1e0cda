"""LocalStorage: staging is invisible until an atomic commit, nothing committed is ever overwritten,
leftovers are cleaned up, deletion never leaves a half-deleted checkpoint that looks committed."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import commit_files
from unbroken._internal import failpoints
from unbroken.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RunDirectoryReplacedError,
    StorageError,
)
from unbroken.format import Manifest
from unbroken.io import FilePlan, live_runs, read_manifest, write_checkpoint
from unbroken.storage import LocalStorage, parse_step_name, step_name
from unbroken.storage.local import LocalWriteHandle, make_dirs_durably

MiB = 1024 * 1024


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "run")



def _entries(storage: LocalStorage) -> list[str]:
    return sorted(os.listdir(storage.root))


# ---------------------------------------------------------------------------------------------
# names, staging, commit, abort
# ---------------------------------------------------------------------------------------------

def test_root_is_created_and_names_start_empty(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert storage.names() == []


def test_a_new_run_directory_is_made_durable_up_to_the_first_existing_parent(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each directory created gets its entry fsynced in its parent, so a power cut after the first
    commit cannot lose the run directory (or a parent created with it)."""
    root = tmp_path / "a" / "b" / "run"
    assert make_dirs_durably(str(root)) == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    assert root.is_dir()
    assert make_dirs_durably(str(root)) == []  # nothing created, nothing to make durable
    monkeypatch.chdir(tmp_path)
    assert make_dirs_durably("rel/run") == [str(tmp_path), str(tmp_path / "rel")]
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        make_dirs_durably(str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError):
        make_dirs_durably(str(tmp_path / "file" / "run"))


def test_a_nested_new_run_directory_takes_checkpoints(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "x" / "y" / "run")
    commit_files(storage, "step_000000001", {"a": b"1"})
    assert LocalStorage(tmp_path / "x" / "y" / "run", create=False).names() == ["step_000000001"]


def test_missing_root_without_create(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        LocalStorage(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()


def test_staging_is_invisible_until_commit(storage: LocalStorage) -> None:
    staging = storage.begin("step_000000001")
    handle = staging.create("data.bin")
    handle.write(memoryview(b"abc"))
    handle.close()
    assert storage.names() == []
    assert not storage.exists("step_000000001")
    assert len(_entries(storage)) == 1  # the staging area lives next to its final name
    staging.commit(b'{"m": 1}')
    assert storage.names() == ["step_000000001"]
    assert storage.exists("step_000000001")
    final = Path(storage.root) / "step_000000001"
    assert (final / "data.bin").read_bytes() == b"abc"
    assert (final / "manifest.json").read_bytes() == b'{"m": 1}'
    assert sorted(os.listdir(final)) == ["data.bin", "manifest.json"]  # no temporary manifest left
    assert _entries(storage) == ["step_000000001"]


def test_two_stagings_of_the_same_name_do_not_collide(storage: LocalStorage) -> None:
    a, b = storage.begin("x"), storage.begin("x")
    a.create("f").close()
    b.create("f").close()
    a.commit(b"{}")
    with pytest.raises(CheckpointExistsError):
        b.commit(b"{}")
    b.abort()
    assert storage.names() == ["x"]
    assert _entries(storage) == ["x"]


def test_abort_removes_the_staging_area(storage: LocalStorage) -> None:
    staging = storage.begin("step_000000002")
    open_handle = staging.create("half.bin")
    open_handle.write(memoryview(b"x" * 100))
    closed = staging.create("done.bin")
    closed.write(memoryview(b"y"))
    closed.close()
    staging.abort()
    assert _entries(storage) == []
    assert storage.names() == []


def test_abort_never_touches_committed_checkpoints(storage: LocalStorage) -> None:
    commit_files(storage, "step_000000001", {"a": b"1"})
    staging = storage.begin("step_000000001")
    staging.create("a").close()
    staging.abort()
    assert storage.names() == ["step_000000001"]
    assert (Path(storage.root) / "step_000000001" / "a").read_bytes() == b"1"


def test_commit_refuses_to_overwrite_a_committed_checkpoint(storage: LocalStorage) -> None:
    commit_files(storage, "step_000000005", {"a": b"old"}, b'{"v": "old"}')
    staging = storage.begin("step_000000005")
    handle = staging.create("a")
    handle.write(memoryview(b"new"))
    handle.close()
    with pytest.raises(CheckpointExistsError):
        staging.commit(b'{"v": "new"}')
    final = Path(storage.root) / "step_000000005"
    assert (final / "a").read_bytes() == b"old"
    assert (final / "manifest.json").read_bytes() == b'{"v": "old"}'
    staging.abort()
    assert _entries(storage) == ["step_000000005"]


@pytest.mark.parametrize("kind", ["empty-dir", "file", "symlink", "dangling-symlink"])
def test_commit_refuses_any_existing_entry_of_that_name(storage: LocalStorage, tmp_path: Path, kind: str) -> None:
    final = Path(storage.root) / "step_000000007"
    if kind == "empty-dir":
        final.mkdir()
    elif kind == "file":
        final.write_bytes(b"user data")
    elif kind == "symlink":
        (tmp_path / "target").mkdir()
        final.symlink_to(tmp_path / "target")
    else:
        final.symlink_to(tmp_path / "nowhere")
    staging = storage.begin("step_000000007")
    staging.create("a").close()
    with pytest.raises(CheckpointExistsError):
        staging.commit(b"{}")
    staging.abort()
    assert os.path.lexists(final)
    if kind == "empty-dir":
        assert final.is_dir() and not final.is_symlink() and list(final.iterdir()) == []
    if kind == "file":
        assert final.read_bytes() == b"user data"
    if kind == "symlink":
        assert final.is_symlink() and list((tmp_path / "target").iterdir()) == []


def test_create_is_exclusive(storage: LocalStorage) -> None:
    staging = storage.begin("x")
    staging.create("f").close()
    with pytest.raises(FileExistsError):
        staging.create("f")
    staging.abort()


def test_names_are_sorted_and_exclude_staging_and_trash(storage: LocalStorage) -> None:
    root = Path(storage.root)
    for name in ["step_000000010", "step_000000002", ".staging-step_000000011-abc", ".trash-step_000000001-def",
                 "notes"]:
        (root / name).mkdir()
    assert storage.names() == ["notes", "step_000000002", "step_000000010"]
    assert storage.exists("notes") and not storage.exists("step_000000003")


def test_names_of_a_vanished_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    assert storage.names() == []
    assert storage.cleanup() == []


def test_step_names() -> None:
    assert step_name(1000) == "step_000001000"
    assert parse_step_name(step_name(1000)) == 1000
    assert parse_step_name(step_name(10**12)) == 10**12
    assert parse_step_name("step_1") is None
    assert parse_step_name(".staging-step_000000001-ab") is None
    assert parse_step_name("step_000000001.bak") is None


# ---------------------------------------------------------------------------------------------
# cleanup and delete
# ---------------------------------------------------------------------------------------------

def test_cleanup_removes_staging_and_trash_leftovers_only(storage: LocalStorage) -> None:
    commit_files(storage, "step_000000001", {"a": b"1"})
    root = Path(storage.root)
    abandoned = storage.begin("step_000000002")  # a save that crashed mid-way
    abandoned.create("a").write(memoryview(b"partial"))
    (root / ".trash-step_000000000-0123").mkdir()
    (root / ".trash-step_000000000-0123" / "f").write_bytes(b"x")
    keep = ["notes.txt", "staging-not-ours", ".staging", ".trashcan", "my.staging-dir"]
    (root / "notes.txt").write_bytes(b"keep me")
    for name in keep[1:]:
        (root / name).mkdir()
    removed = storage.cleanup()
    assert len(removed) == 2
    assert all(r.startswith((".staging-", ".trash-")) for r in removed)
    assert sorted(_entries(storage)) == sorted(keep + ["step_000000001"])
    assert (root / "notes.txt").read_bytes() == b"keep me"
    assert (root / "step_000000001" / "a").read_bytes() == b"1"
    assert storage.cleanup() == []


def test_cleanup_reports_only_what_it_removed(storage: LocalStorage) -> None:
    leftover = Path(storage.root) / ".trash-step_000000001-abc"
    leftover.write_bytes(b"x")
    removed = storage.cleanup()
    assert (removed == [leftover.name]) == (not leftover.exists())


def test_delete_removes_a_checkpoint(storage: LocalStorage) -> None:
    commit_files(storage, "step_000000001", {"a": b"1"})
    commit_files(storage, "step_000000002", {"a": b"2"})
    storage.delete("step_000000001")
    assert storage.names() == ["step_000000002"]
    assert _entries(storage) == ["step_000000002"]


def test_delete_goes_through_a_trash_name(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete interrupted half-way leaves a trash area, never a half-deleted 'committed' checkpoint."""
    commit_files(storage, "step_000000001", {"a": b"1", "b": b"2"})

    def crash(path: str, *args: object, **kwargs: object) -> None:
        os.unlink(os.path.join(path, "a"))  # got half-way
        raise OSError(errno.EIO, "simulated crash during delete")

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(StorageError):
        storage.delete("step_000000001")
    monkeypatch.undo()
    assert storage.names() == []
    assert not storage.exists("step_000000001")
    leftovers = _entries(storage)
    assert len(leftovers) == 1 and leftovers[0].startswith(".trash-")
    assert storage.cleanup() == leftovers
    assert _entries(storage) == []


def test_delete_of_a_missing_checkpoint_is_a_storage_error(storage: LocalStorage) -> None:
    with pytest.raises(StorageError) as info:
        storage.delete("step_000000009")
    assert isinstance(info.value, OSError)
    assert "step_000000009" in str(info.value)


# ---------------------------------------------------------------------------------------------
# a run directory deleted or replaced under an open storage (another job's run now)
# ---------------------------------------------------------------------------------------------

def _replace_root(storage: LocalStorage) -> Path:
    """``rm -rf run`` and a new job at the same path, with a checkpoint and a save in flight."""
    shutil.rmtree(storage.root)
    other = LocalStorage(storage.root)
    commit_files(other, "step_000000001", {"a": b"theirs"})
    other.begin("step_000000002").create("a").write(memoryview(b"in flight"))
    return Path(storage.root)


def _their_entries(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_replaced_run_directory_is_never_written_into_or_deleted_from(storage: LocalStorage) -> None:
    commit_files(storage, "step_000000001", {"a": b"ours"})
    root = _replace_root(storage)
    theirs = _their_entries(root)
    fix = r"deleted or replaced since this process opened it.*nothing was written.*Fix: restart the job"
    with pytest.raises(RunDirectoryReplacedError, match=rf"{root}: the run directory was {fix}"):
        storage.begin("step_000000003")
    with pytest.raises(RunDirectoryReplacedError, match=fix):
        storage.delete("step_000000001")
    with pytest.raises(RunDirectoryReplacedError, match=fix):
        storage.cleanup()  # their save in flight is not our leftover
    assert _their_entries(root) == theirs
    assert isinstance(RunDirectoryReplacedError("x"), StorageError)


def test_a_save_begun_before_the_run_directory_was_replaced_commits_nothing(storage: LocalStorage) -> None:
    staging = storage.begin("step_000000003")
    handle = staging.create("a")
    handle.write(memoryview(b"ours"))
    handle.close()
    root = _replace_root(storage)
    theirs = _their_entries(root)
    with pytest.raises(RunDirectoryReplacedError, match="deleted or replaced"):
        staging.commit(b"{}")
    staging.abort()
    assert _their_entries(root) == theirs
    assert not (root / "step_000000003").exists()


def test_a_commit_never_lands_in_a_run_directory_replaced_while_it_was_written(storage: LocalStorage,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The check right before the commit rename: even a staging area that ended up in the new run
    directory (replaced between begin's check and its mkdir) is never published there."""
    staging = storage.begin("step_000000003")
    staging.create("a").close()
    root = Path(storage.root)

    def replace_at_the_rename(point: str) -> None:
        if point == "commit.rename":
            old = root.with_name("old")
            root.rename(old)
            LocalStorage(root)
            (old / Path(staging.path).name).rename(Path(staging.path))

    monkeypatch.setattr(failpoints, "hit", replace_at_the_rename)
    with pytest.raises(RunDirectoryReplacedError, match="refused to commit step_000000003"):
        staging.commit(b"{}")
    staging.abort()
    assert _entries(storage) == []


def test_a_deleted_run_directory_is_not_recreated_by_a_save(storage: LocalStorage) -> None:
    shutil.rmtree(storage.root)
    with pytest.raises(RunDirectoryReplacedError, match="deleted or replaced"):
        storage.begin("step_000000001")
    assert not Path(storage.root).exists()
    assert storage.cleanup() == []  # nothing there to clean, and nothing of another run touched


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def test_open_and_read_into(storage: LocalStorage) -> None:
    data = bytes(range(256)) * 10
    commit_files(storage, "c", {"f": data})
    with storage.open("c", "f") as handle:
        assert handle.size == len(data)
        buf = bytearray(100)
        handle.read_into(50, memoryview(buf))
        assert bytes(buf) == data[50:150]
        arr = np.zeros(4, dtype=np.float32)  # a non-byte memoryview is filled byte-wise
        handle.read_into(0, memoryview(arr))
        assert arr.tobytes() == data[:16]


def test_read_past_the_end_is_corrupt(storage: LocalStorage) -> None:
    commit_files(storage, "c", {"f": b"0123456789"})
    with storage.open("c", "f") as handle:
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            handle.read_into(5, memoryview(bytearray(10)))


def test_open_missing_checkpoint_and_file(storage: LocalStorage) -> None:
    commit_files(storage, "c", {"f": b"1"})
    with pytest.raises(CheckpointNotFoundError):
        storage.open("nope", "f")
    with pytest.raises(CorruptCheckpointError, match="missing"):
        storage.open("c", "g")


def test_open_refuses_a_symlinked_checkpoint_directory(storage: LocalStorage, tmp_path: Path) -> None:
    elsewhere = LocalStorage(tmp_path / "elsewhere")
    commit_files(elsewhere, "c", {"f": b"secret"})
    (Path(storage.root) / "c").symlink_to(Path(elsewhere.root) / "c")
    with pytest.raises(CorruptCheckpointError, match="not a real directory"):
        storage.open("c", "f")


# ---------------------------------------------------------------------------------------------
# LocalWriteHandle: large, small, odd and short writes
# ---------------------------------------------------------------------------------------------

def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_large_write_goes_through_intact(tmp_path: Path) -> None:
    data = _random_bytes(9 * MiB + 7)
    handle = LocalWriteHandle(str(tmp_path / "f"))
    handle.write(memoryview(b"head"))
    handle.write(memoryview(data))
    handle.write(memoryview(b"tail"))
    handle.close()
    assert (tmp_path / "f").read_bytes() == b"head" + data + b"tail"


def test_many_small_writes_are_coalesced_in_order(tmp_path: Path) -> None:
    chunks = [_random_bytes(i % 997 + 1, seed=i) for i in range(12000)]  # ~6 MiB: crosses the buffer size
    handle = LocalWriteHandle(str(tmp_path / "f"))
    for chunk in chunks:
        handle.write(memoryview(chunk))
    handle.close()
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)


def test_sliced_and_typed_memoryviews(tmp_path: Path) -> None:
    floats = np.arange(2 * MiB, dtype=np.float32)  # 8 MiB, a memoryview with format 'f'
    small = np.arange(10, dtype=np.int64).reshape(2, 5)
    raw = _random_bytes(5 * MiB)
    handle = LocalWriteHandle(str(tmp_path / "f"))
    handle.write(memoryview(floats))
    handle.write(memoryview(small))
    handle.write(memoryview(raw)[3:-3])
    handle.close()
    assert (tmp_path / "f").read_bytes() == floats.tobytes() + small.tobytes() + raw[3:-3]


def test_short_writes_are_retried_until_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = []

    def short_write(fd: int, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        n = max(1, min(len(view) // 3, 300_007))
        calls.append(n)
        return real_write(fd, view[:n])

    data = _random_bytes(5 * MiB + 11)
    small = [_random_bytes(1000, seed=i) for i in range(50)]
    handle = LocalWriteHandle(str(tmp_path / "f"))
    monkeypatch.setattr(os, "write", short_write)
    for chunk in small:
        handle.write(memoryview(chunk))
    handle.write(memoryview(data))
    handle.close()
    monkeypatch.undo()
    assert len(calls) > 10
    assert (tmp_path / "f").read_bytes() == b"".join(small) + data


def test_write_after_close_is_refused(tmp_path: Path) -> None:
    handle = LocalWriteHandle(str(tmp_path / "f"))
    handle.write(memoryview(b"a"))
    handle.close()
    with pytest.raises(StorageError):
        handle.write(memoryview(_random_bytes(5 * MiB)))
    assert (tmp_path / "f").read_bytes() == b"a"


def test_small_write_after_close_is_refused(tmp_path: Path) -> None:
    handle = LocalWriteHandle(str(tmp_path / "f"))
    handle.close()
    with pytest.raises(StorageError):
        handle.write(memoryview(b"lost"))


def _fsync_failing_for(kind: str) -> object:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if (kind == "dir") == is_dir:
            raise OSError(errno.EIO, f"simulated fsync failure ({kind})")
        real_fsync(fd)

    return fsync


def test_failed_file_fsync_fails_the_save_and_commits_nothing(storage: LocalStorage,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = Manifest(step=1, created=0.0, world_size=1, versions={}, files={}, tensors={}, state={})
    monkeypatch.setattr(os, "fsync", _fsync_failing_for("file"))
    with pytest.raises(OSError, match="simulated"):
        _write(storage, "step_000000001", {"w": torch.ones(3)}, manifest)
    monkeypatch.undo()
    assert storage.names() == []
    assert _entries(storage) == []


def test_failed_directory_fsync_at_begin_leaves_no_staging(storage: LocalStorage,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = Manifest(step=1, created=0.0, world_size=1, versions={}, files={}, tensors={}, state={})
    monkeypatch.setattr(os, "fsync", _fsync_failing_for("dir"))
    with pytest.raises(OSError, match="simulated"):
        _write(storage, "step_000000001", {"w": torch.ones(3)}, manifest)
    monkeypatch.undo()
    assert storage.names() == []
    assert _entries(storage) == []


def test_write_checkpoint_commits_a_readable_checkpoint(storage: LocalStorage) -> None:
    manifest = Manifest(step=4, created=1.0, world_size=1, versions={}, files={}, tensors={}, state={})
    committed = _write(storage, "step_000000004", {"w": torch.ones(3), "e": torch.zeros(0)}, manifest)
    assert storage.names() == ["step_000000004"]
    assert read_manifest(storage, "step_000000004") == committed
    assert set(committed.tensors) == {"w", "e"}
    with pytest.raises(CheckpointExistsError):
        _write(storage, "step_000000004", {"w": torch.zeros(3)}, manifest)
    assert read_manifest(storage, "step_000000004") == committed
    assert storage.names() == ["step_000000004"] and _entries(storage) == ["step_000000004"]


def _write(storage: LocalStorage, name: str, tensors: dict, manifest):
    plan = FilePlan.build(tensors)
    return write_checkpoint(storage, name, plan, live_runs(plan, tensors), manifest)
