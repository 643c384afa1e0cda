"""FsspecStorage on a real S3 API (moto's server on 127.0.0.1) and on memory://: data objects first,
the manifest last as the commit record, committed steps never overwritten, aborts and deletes that
never leave something looking committed, faults surfacing as our errors, and no credential leaks."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests.helpers import assert_exactly_equal, commit_files, make_training_state, snapshot
from tests.s3server import SECRET, S3Run, S3Server
from unbroken._internal.gcpause import paused_gc
from unbroken.checkpoint.single import build_manifest, load_checkpoint, save_checkpoint
from unbroken.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError, StorageError
from unbroken.io import FilePlan, live_runs, read_manifest, verify_checkpoint, write_checkpoint
from unbroken.state import capture
from unbroken.storage import FsspecStorage, LocalStorage, Storage, is_url, open_storage, step_name
from unbroken.storage.remote import MANIFEST, display_url

pytest.importorskip("fsspec")

MiB = 1024 * 1024
BLOCK = 5 * MiB  # S3's smallest multipart part: objects above it take the multipart path
STEP = step_name(1)
DATA = "rank00000.safetensors"


def _s3_storage(run: S3Run, **kwargs: Any) -> FsspecStorage:
    storage = FsspecStorage(run.url, run.storage_options, block_size=BLOCK, upload_attempts=2,
                            retry_backoff_s=0.01, **kwargs)
    storage.fs.retries = 2  # s3fs's own retry loop, 5 by default (this instance is private: skip_instance_cache)
    return storage


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://unbroken-{uuid.uuid4().hex}/run"
    yield url
    storage = FsspecStorage(url)
    if storage.fs.exists(storage.root):
        storage.fs.rm(storage.root, recursive=True)


@pytest.fixture(params=["s3", "memory"])
def remote(request: pytest.FixtureRequest, memory_url: str) -> FsspecStorage:
    if request.param == "s3":
        return _s3_storage(request.getfixturevalue("s3_run"))
    return FsspecStorage(memory_url, block_size=BLOCK, retry_backoff_s=0.01)


@pytest.fixture
def s3(s3_run: S3Run) -> FsspecStorage:
    return _s3_storage(s3_run)



def _read(storage: Storage, name: str, file_name: str) -> bytes:
    with storage.open(name, file_name) as handle:
        out = bytearray(handle.size)
        handle.read_into(0, memoryview(out))
    return bytes(out)


def _objects(storage: FsspecStorage) -> list[str]:
    return sorted(p[len(storage.root) + 1:] for p in storage.fs.find(storage.root))


def _payload(size: int, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------

def test_write_commit_read_round_trip(remote: FsspecStorage) -> None:
    small, large = _payload(1000), _payload(2 * BLOCK + 123, seed=1)  # large: multipart on S3
    commit_files(remote, STEP, {"a.bin": small, "b.bin": large}, b'{"m": 1}')
    assert remote.names() == [STEP] and remote.exists(STEP)
    assert remote.atomic_create == remote.url.startswith("s3://")  # S3: If-None-Match; memory: verified
    assert _read(remote, STEP, "a.bin") == small
    assert _read(remote, STEP, "b.bin") == large
    assert _read(remote, STEP, MANIFEST) == b'{"m": 1}'
    with remote.open(STEP, "b.bin") as handle:  # a ranged read across the object
        piece = bytearray(BLOCK)
        handle.read_into(BLOCK - 7, memoryview(piece))
        assert bytes(piece) == large[BLOCK - 7:2 * BLOCK - 7] and handle.map() is None


def test_reads_of_any_size_anywhere(remote: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small reads come from a read-ahead window, large ones from parallel ranged GETs: same bytes."""
    import random

    from unbroken.storage import remote_files

    monkeypatch.setattr(remote_files, "READ_CHUNK", 64 * 1024)
    data = _payload(MiB + 17)
    commit_files(remote, STEP, {DATA: data})
    rng = random.Random(0)
    with remote.open(STEP, DATA) as handle:
        for _ in range(40):
            size = rng.choice([0, 1, 8, 1000, 64 * 1024 - 1, 64 * 1024, 300_000, MiB + 17])
            offset = rng.randrange(0, len(data) - size + 1)
            out = bytearray(size)
            handle.read_into(offset, memoryview(out))
            assert bytes(out) == data[offset:offset + size], (offset, size)
        with pytest.raises(CorruptCheckpointError, match="short read"):
            handle.read_into(len(data) - 3, memoryview(bytearray(4)))


def test_uncommitted_step_is_listed_but_not_committed(remote: FsspecStorage) -> None:
    staging = remote.begin(STEP)
    handle = staging.create(DATA)
    handle.write(memoryview(b"x" * 100))
    handle.close()
    assert remote.names() == [STEP] and not remote.exists(STEP)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: object is missing"):
        read_manifest(remote, STEP)
    staging.commit(b"{}")
    assert remote.exists(STEP)


def test_save_and_load_checkpoint_bitwise(remote: FsspecStorage) -> None:
    state = make_training_state(0)
    state["big"] = torch.randn(3 * BLOCK // 4 + 5)  # ~3.75 MiB x 4 bytes: the data object is multipart
    saved = {k: snapshot(v) for k, v in state.items()}
    save_checkpoint(remote, STEP, state, step=1, metrics={"loss": 0.5})
    assert verify_checkpoint(remote, STEP).step == 1
    fresh = make_training_state(1, trained=False)
    fresh["big"] = torch.zeros_like(state["big"])
    load_checkpoint(remote, STEP, fresh)
    for key, before in saved.items():
        assert_exactly_equal(before, snapshot(fresh[key]), key)


def test_multipart_upload_is_used_above_the_block_size(s3: FsspecStorage, s3_run: S3Run,
                                                        s3_server: S3Server) -> None:
    data = _payload(2 * BLOCK + 1)
    commit_files(s3, STEP, {"big.bin": data, "small.bin": b"s"})
    client = s3_server.client()
    big = client.head_object(Bucket=s3_run.bucket, Key=f"run/{STEP}/big.bin")
    small = client.head_object(Bucket=s3_run.bucket, Key=f"run/{STEP}/small.bin")
    assert big["ETag"].strip('"').endswith("-3")  # a multipart ETag counts its parts
    assert "-" not in small["ETag"]
    assert _read(s3, STEP, "big.bin") == data


# ---------------------------------------------------------------------------------------------
# never overwrite, abort, delete, cleanup
# ---------------------------------------------------------------------------------------------

def test_committed_step_is_never_overwritten(remote: FsspecStorage) -> None:
    commit_files(remote, STEP, {DATA: b"first"}, b"m1")
    with pytest.raises(CheckpointExistsError):
        remote.begin(STEP)
    late = remote.begin(step_name(2))
    commit_files(remote, step_name(2), {DATA: b"winner"}, b"m2")  # another writer commits the same step
    with pytest.raises(CheckpointExistsError):
        late.create(DATA)
    late.abort()
    assert _read(remote, step_name(2), DATA) == b"winner" and _read(remote, step_name(2), MANIFEST) == b"m2"


def test_the_manifest_is_created_conditionally(remote: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the pre-commit check misses a concurrent commit, the manifest is never replaced."""
    staging = remote.begin(STEP)
    handle = staging.create("mine.bin")
    handle.write(memoryview(b"mine"))
    handle.close()
    remote.fs.pipe_file(remote.path(STEP, MANIFEST), b"theirs")  # the other writer's commit record
    monkeypatch.setattr(FsspecStorage, "exists", lambda self, name: False)  # lose the race on purpose
    with pytest.raises(CheckpointExistsError, match="another writer"):
        staging.commit(b"ours")
    monkeypatch.undo()
    staging.abort()
    assert _read(remote, STEP, MANIFEST) == b"theirs"
    assert "mine.bin" in " ".join(_objects(remote))  # abort touches nothing of a committed step


def test_lost_reply_of_a_manifest_upload_is_a_successful_commit(remote: FsspecStorage,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried conditional create finds its own manifest (first reply lost): the read-back says ours."""
    real = remote.fs.pipe_file
    calls: list[int] = []

    def reply_lost(path: str, data: bytes, **kwargs: Any) -> None:
        real(path, data, **kwargs)
        calls.append(1)
        if len(calls) == 1 and path.endswith(MANIFEST):
            raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(remote.fs, "pipe_file", reply_lost)
    commit_files(remote, STEP, {DATA: b"d"}, b"manifest")
    assert remote.exists(STEP) and _read(remote, STEP, MANIFEST) == b"manifest"


def test_abort_removes_every_object_written(remote: FsspecStorage, s3_server: S3Server,
                                            request: pytest.FixtureRequest) -> None:
    staging = remote.begin(STEP)
    for file_name, size in (("small.bin", 100), ("big.bin", 2 * BLOCK + 5)):
        handle = staging.create(file_name)
        handle.write(memoryview(_payload(size)))
        handle.close()
    unfinished = staging.create("unfinished.bin")  # a multipart upload in progress
    unfinished.write(memoryview(_payload(BLOCK + 1)))
    staging.abort()
    assert _objects(remote) == [] and remote.names() == []
    if "s3" in request.node.callspec.id:
        assert s3_server.client().list_multipart_uploads(Bucket=remote.root.split("/")[0]).get("Uploads", []) == []


def test_write_failure_discards_the_upload_and_commits_nothing(remote: FsspecStorage) -> None:
    def runs() -> Iterator[Any]:
        yield memoryview(_payload(BLOCK + 10)), []
        raise RuntimeError("capture failed")

    plan = FilePlan.build({})
    with pytest.raises(RuntimeError, match="capture failed"):
        write_checkpoint(remote, STEP, plan, runs(), build_manifest(capture({}, rng=False), 1, None, None))
    assert _objects(remote) == []
    if remote.url.startswith("s3://"):  # the multipart upload that had started is aborted, not left behind
        listed = remote.fs.call_s3("list_multipart_uploads", Bucket=remote.root.split("/")[0])
        assert listed.get("Uploads", []) == []


def test_delete_removes_the_manifest_first(remote: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    commit_files(remote, STEP, {"a.bin": b"a", "b.bin": b"b"})
    removed: list[str] = []
    real = remote.fs.rm_file

    def rm_file(path: str, **kwargs: Any) -> None:
        removed.append(path.rsplit("/", 1)[-1])
        if len(removed) == 2:
            raise PermissionError(13, "Access Denied")  # fail half-way through
        real(path, **kwargs)

    def rm(paths: list[str], **kwargs: Any) -> None:  # a batch delete: the same failure, half-way through
        for path in paths:
            rm_file(path)

    monkeypatch.setattr(remote.fs, "rm_file", rm_file)
    monkeypatch.setattr(remote.fs, "rm", rm)
    with pytest.raises(StorageError, match="Access Denied.*credentials"):
        remote.delete(STEP)
    assert removed[0] == MANIFEST
    assert not remote.exists(STEP)  # half-deleted, and not looking committed
    with pytest.raises(CorruptCheckpointError):
        verify_checkpoint(remote, STEP)
    monkeypatch.undo()
    remote.delete(STEP)  # a later delete finishes the job
    assert _objects(remote) == [] and remote.names() == []


def test_missing_checkpoints(remote: FsspecStorage) -> None:
    with pytest.raises(CheckpointNotFoundError):
        remote.open(STEP, MANIFEST)
    with pytest.raises(CheckpointNotFoundError):
        remote.delete(STEP)
    with pytest.raises(CheckpointNotFoundError):
        FsspecStorage(remote.url + "-nothing-here", remote._options, create=False)
    assert remote.names() == [] and not remote.exists(STEP)


def test_path_like_names_are_refused(remote: FsspecStorage) -> None:
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(CorruptCheckpointError, match="not a plain name"):
            remote.open(STEP, bad)


def test_cleanup_removes_old_uncommitted_steps_only(remote: FsspecStorage) -> None:
    commit_files(remote, step_name(1), {DATA: b"committed"})
    for name in (step_name(2), step_name(3)):  # abandoned: data written, never committed
        handle = remote.begin(name).create(DATA)
        handle.write(memoryview(b"orphan"))
        handle.close()
    assert remote.cleanup() == []  # inside the grace period: maybe a concurrent save in progress
    remote.cleanup_grace_s = 0
    assert sorted(remote.cleanup()) == [step_name(2), step_name(3)]
    assert remote.names() == [step_name(1)] and _read(remote, step_name(1), DATA) == b"committed"


def test_cleanup_aborts_stale_multipart_uploads(s3: FsspecStorage, s3_server: S3Server, s3_run: S3Run) -> None:
    handle = s3.begin(STEP).create(DATA)
    handle.write(memoryview(_payload(BLOCK + 1)))  # a killed process leaves its upload open
    del handle  # collected unfinished: the partial upload must not be completed
    client = s3_server.client()
    [upload] = client.list_multipart_uploads(Bucket=s3_run.bucket)["Uploads"]
    s3.clock = lambda: upload["Initiated"].timestamp() + 60  # moto reports a fixed "Initiated" date
    assert s3.cleanup() == []  # a minute old: maybe a save in progress
    s3.clock = lambda: upload["Initiated"].timestamp() + 2 * 3600
    assert s3.cleanup() == [f"{STEP}/{DATA} (incomplete upload)"]
    assert client.list_multipart_uploads(Bucket=s3_run.bucket).get("Uploads", []) == []
    assert s3.names() == []  # never completed


# ---------------------------------------------------------------------------------------------
# corruption after commit
# ---------------------------------------------------------------------------------------------

def _saved(storage: FsspecStorage) -> dict[str, Any]:
    state = {"w": torch.arange(1000, dtype=torch.float32), "epoch": 1}
    save_checkpoint(storage, STEP, state, step=1, rng=False)
    return state


def test_data_object_deleted_after_commit(remote: FsspecStorage) -> None:
    _saved(remote)
    remote.fs.rm_file(remote.path(STEP, DATA))
    with pytest.raises(CorruptCheckpointError, match=f"{remote.url}/{STEP}/{DATA}: object is missing"):
        verify_checkpoint(remote, STEP)


def test_data_object_replaced_by_one_of_the_wrong_size(remote: FsspecStorage) -> None:
    _saved(remote)
    remote.fs.pipe_file(remote.path(STEP, DATA), b"\0" * 100)
    with pytest.raises(CorruptCheckpointError, match=f"{remote.url}/{STEP}/{DATA}: file is 100 bytes"):
        verify_checkpoint(remote, STEP)


def test_object_shrinking_while_open_is_a_short_read(remote: FsspecStorage) -> None:
    commit_files(remote, STEP, {DATA: _payload(5000)})
    with remote.open(STEP, DATA) as handle:
        remote.fs.pipe_file(remote.path(STEP, DATA), b"short")
        with pytest.raises(CorruptCheckpointError, match=f"{DATA}: .*(truncated|changed)"):
            handle.read_into(0, memoryview(bytearray(5000)))


# ---------------------------------------------------------------------------------------------
# an unreachable endpoint
# ---------------------------------------------------------------------------------------------

def _big_state() -> dict[str, Any]:
    return {"a": torch.randn(BLOCK // 4), "b": torch.randn(BLOCK // 4), "c": torch.randn(1000)}


def _write(storage: FsspecStorage, state: dict[str, Any], hook: Callable[[int], None]) -> None:
    """``write_checkpoint`` of ``state`` calling ``hook(bytes written so far)`` before each run."""
    with paused_gc():
        snap = capture(state, rng=False)
        plan = FilePlan.build(snap.tensors)
        manifest = build_manifest(snap, 1, None, None)

    def runs() -> Iterator[Any]:
        done = 0
        for run in live_runs(plan, snap.tensors):
            hook(done)
            yield run
            done += len(run[0])

    write_checkpoint(storage, STEP, plan, runs(), manifest)


def test_server_stopped_mid_upload_then_a_retry_succeeds(s3: FsspecStorage, s3_server: S3Server,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    state = _big_state()
    stop_after_first_part = lambda done: s3_server.stop() if done > BLOCK else None  # noqa: E731
    with pytest.raises(StorageError) as failure, caplog.at_level(logging.WARNING, "unbroken"):
        _write(s3, state, stop_after_first_part)
    assert s3.url in str(failure.value) and "Fix:" in str(failure.value)
    assert SECRET not in str(failure.value) + caplog.text
    s3_server.start()
    assert not s3.exists(STEP)  # no manifest: nothing committed
    _write(s3, state, lambda done: None)  # the same save again: idempotent
    loaded = {"a": torch.zeros_like(state["a"]), "b": torch.zeros_like(state["b"]), "c": torch.zeros(1000)}
    load_checkpoint(s3, STEP, loaded, rng=False)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_server_stopped_before_commit(s3: FsspecStorage, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    from unbroken.storage.remote_files import FsspecStaging

    real_commit = FsspecStaging.commit

    def stop_then_commit(self: FsspecStaging, manifest: bytes) -> None:
        s3_server.stop()
        real_commit(self, manifest)

    monkeypatch.setattr(FsspecStaging, "commit", stop_then_commit)
    with pytest.raises(StorageError, match="Fix:"):
        save_checkpoint(s3, STEP, {"w": torch.ones(10)}, step=1, rng=False)
    monkeypatch.undo()
    s3_server.start()
    assert not s3.exists(STEP)
    save_checkpoint(s3, STEP, {"w": torch.ones(10)}, step=1, rng=False)
    assert verify_checkpoint(s3, STEP).step == 1


def test_transient_upload_failures_are_retried(remote: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    real = remote.fs.pipe_file
    failures = [ConnectionResetError(104, "Connection reset by peer"), TimeoutError("read timed out")]

    def flaky(path: str, data: bytes, **kwargs: Any) -> None:
        if failures:
            raise failures.pop(0)
        real(path, data, **kwargs)

    monkeypatch.setattr(remote.fs, "pipe_file", flaky)
    remote.upload_attempts = 3
    commit_files(remote, STEP, {DATA: b"d"})
    assert _read(remote, STEP, DATA) == b"d"


def test_permanent_upload_failures_are_not_retried(remote: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def denied(path: str, data: bytes, **kwargs: Any) -> None:
        calls.append(path)
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr(remote.fs, "pipe_file", denied)
    with pytest.raises(StorageError, match="Access Denied. Fix: check the credentials"):
        commit_files(remote, STEP, {DATA: b"d"})
    assert len(calls) == 1


def test_missing_bucket_names_the_fix(s3_run: S3Run) -> None:
    storage = FsspecStorage("s3://no-such-bucket-unbroken/run", s3_run.storage_options)
    assert storage.names() == []
    with pytest.raises(StorageError, match="bucket .* exists"):
        commit_files(storage, STEP, {DATA: b"d"})


# ---------------------------------------------------------------------------------------------
# credentials, opening
# ---------------------------------------------------------------------------------------------

def test_credentials_never_appear_in_reprs_or_errors(s3: FsspecStorage, s3_server: S3Server) -> None:
    assert SECRET not in repr(s3) and "'secret': '***'" in repr(s3) and "'key': '***'" in repr(s3)
    s3_server.stop()
    for action in (s3.names, lambda: s3.open(STEP, DATA), lambda: commit_files(s3, STEP, {DATA: b"d"})):
        with pytest.raises(StorageError) as failure:
            action()
        assert SECRET not in str(failure.value) and "AKIA" not in str(failure.value)
    assert display_url("s3://user:pass@bucket/run?token=abc") == "s3://bucket/run"
    assert "pass" not in FsspecStorage("memory://user:pass@x/run").url


def test_error_messages_are_scrubbed_of_secrets(remote: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FsspecStorage(remote.url, {**remote._options, "token": "tok-123456"}, retry_backoff_s=0)
    monkeypatch.setattr(storage.fs, "pipe_file",
                        lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "bad token tok-123456")))
    with pytest.raises(StorageError) as failure:
        commit_files(storage, STEP, {DATA: b"d"})
    assert "tok-123456" not in str(failure.value) and "bad token ***" in str(failure.value)


def test_open_storage_routes_paths_and_urls(tmp_path: Any, memory_url: str) -> None:
    assert isinstance(open_storage(tmp_path / "a"), LocalStorage)
    assert isinstance(open_storage(str(tmp_path / "b")), LocalStorage)
    local = open_storage(f"file://{tmp_path}/c")
    assert isinstance(local, LocalStorage) and local.root == str(tmp_path / "c")
    assert isinstance(open_storage(memory_url), FsspecStorage)
    with pytest.raises(ValueError, match="storage_options"):
        open_storage(tmp_path / "d", {"key": "k"})
    with pytest.raises(ValueError, match="unknown storage protocol"):
        open_storage("nosuchproto://x/y")
    with pytest.raises(CheckpointNotFoundError):
        open_storage(tmp_path / "missing", create=False)


def test_missing_fsspec_implementation_names_the_package() -> None:
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install gcsfs"):
        open_storage("gs://bucket/run")


def test_is_url() -> None:
    assert is_url("s3://b/r") and is_url("memory://r") and is_url("file:///tmp/x") and is_url("simplecache::s3://b")
    assert not is_url("runs/exp1") and not is_url("/abs/path") and not is_url("C:\\runs") and not is_url("a:b")


def test_unbroken_works_without_fsspec() -> None:
    """fsspec is optional: local storage works without it, and a URL names what to install."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fsspec'] = None\n"
            "import tempfile, unbroken\n"
            "from unbroken.storage import open_storage\n"
            "print(type(open_storage(tempfile.mkdtemp())).__name__)\n"
            "try:\n    open_storage('s3://bucket/run')\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines()[0] == "LocalStorage" and "pip install 'unbroken[s3]'" in out


def test_deleting_a_checkpoint_of_many_objects_is_one_batch_request_after_the_manifest(
        s3: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention on object storage: the manifest first (the checkpoint stops looking committed), then
    every other object in one DeleteObjects request (up to 1,000 keys each), not one DELETE per object."""
    commit_files(s3, STEP, {f"rank{r:05d}.safetensors": b"x" for r in range(30)})
    calls: list[tuple[str, int]] = []
    real = s3.fs._call_s3

    async def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
        if method.startswith("delete"):
            keys = kwargs.get("Delete", {}).get("Objects", [kwargs.get("Key")])
            calls.append((method, len(keys)))
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(s3.fs, "_call_s3", call_s3)
    s3.delete(STEP)
    assert calls == [("delete_object", 1), ("delete_objects", 30)]
    assert not s3.exists(STEP) and s3.fs.find(s3.path(STEP)) == []


def test_objects_a_batch_delete_left_are_deleted_one_by_one(remote: FsspecStorage,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch reports no failure of a single key (S3's DeleteObjects answers 200 with per-key errors):
    what is still listed afterwards is deleted again, one request each, whose failure would raise."""
    commit_files(remote, STEP, {"a.bin": b"a", "b.bin": b"b", "c.bin": b"c"})
    real_rm = remote.fs.rm
    monkeypatch.setattr(remote.fs, "rm", lambda paths, **kw: real_rm([p for p in paths if not p.endswith("b.bin")]))
    remote.delete(STEP)
    assert remote.fs.find(remote.path(STEP)) == []
