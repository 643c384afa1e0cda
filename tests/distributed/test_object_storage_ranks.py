"""Several ranks of a torch.distributed job checkpoint into one s3:// run (moto's S3 server over HTTP,
gloo ranks as subprocesses, the endpoint handed to them in ``FSSPEC_S3``): each rank uploads its own
file, rank 0 commits the manifest last.  DDP killed and resumed bitwise, FSDP2 saved and restored,
4 ranks resumed on 2, one rank SIGKILLed in the middle of its multipart upload (nothing committed,
cleanup removes the debris after the grace period), and a rank's ranged reads of a large object."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import unbroken
from tests.s3server import S3Run, S3Server
from unbroken.storage import FsspecStorage, remote_files

from .harness import HERE, kill_all, launch, run_ok, wait_all, wait_for
from .test_ddp_resume import STEPS, assert_same_run
from .test_fsdp_reshard import assert_equal_files
from .test_world_size_change import DATASET, MID_EPOCH, samples

DDP = HERE / "ddp_worker.py"
WORKER = HERE / "s3_worker.py"
MiB = 1 << 20


def steps(s3_run: S3Run, verify: bool = False) -> list[tuple[int, bool]]:
    return [(r.step, r.valid) for r in unbroken.list_checkpoints(s3_run.url, verify=verify,
                                                                  storage_options=s3_run.storage_options)]


def stored_bytes(s3_server: S3Server, s3_run: S3Run, step: int) -> int:
    listing = s3_server.client().list_objects_v2(Bucket=s3_run.bucket, Prefix=f"run/step_{step:09d}/")
    return sum(item["Size"] for item in listing.get("Contents", []))


@pytest.mark.timeout(240)
def test_ddp_ranks_killed_mid_run_resume_bitwise_from_the_bucket(s3_server: S3Server, s3_run: S3Run,
                                                                  tmp_path: Path) -> None:
    env = s3_server.environment()
    model = ["--batchnorm"]  # buffers differ between ranks after each step: the checkpoint must hold rank 0's
    run_ok(DDP, [tmp_path / "ref_run", tmp_path / "ref", STEPS, *model], 2, tmp_path / "logs_ref")
    kill_at = random.Random(2).randint(6, 9)
    ranks = launch(DDP, [s3_run.url, tmp_path / "out", STEPS, *model], 2, tmp_path / "logs_crash", env=env)
    wait_for(ranks, f"STEP {kill_at}\n", timeout=120)
    kill_all(ranks)  # SIGKILL: an asynchronous save may be half-uploaded
    assert all(r.proc.returncode == -9 for r in ranks)
    assert any(ok for _, ok in steps(s3_run))  # saves were committed in the bucket before the kill

    resumed = run_ok(DDP, [s3_run.url, tmp_path / "out", STEPS, *model], 2, tmp_path / "logs_resume", env=env)
    start = int(resumed[0].output().split("START ", 1)[1].split()[0])
    assert 2 <= start <= kill_at, resumed[0].output()
    assert_same_run(tmp_path / "ref", tmp_path / "out", 2)
    assert steps(s3_run, verify=True) == [(10, True), (12, True)]  # retention ran in the bucket


@pytest.mark.timeout(180)
def test_fsdp2_saved_into_the_bucket_restores_bitwise_and_only_rank_0_reads_in_broadcast_mode(
        s3_server: S3Server, s3_run: S3Run, tmp_path: Path) -> None:
    env = s3_server.environment()
    run_ok(WORKER, ["fsdp-save", s3_run.url, tmp_path / "saved"], 2, tmp_path / "logs_save", env=env)
    manifest = unbroken.read_info(f"{s3_run.url}/step_000000003", storage_options=s3_run.storage_options).manifest
    assert manifest.world_size == 2 and sorted(manifest.files) == ["rank00000.safetensors", "rank00001.safetensors"]
    total = stored_bytes(s3_server, s3_run, 3)
    manifest_bytes = s3_server.client().head_object(Bucket=s3_run.bucket,
                                                    Key="run/step_000000003/manifest.json")["ContentLength"]

    ranks = run_ok(WORKER, ["fsdp-restore", s3_run.url, tmp_path / "out", "--broadcast"], 2, tmp_path / "logs",
                   env=env)
    assert "RESTORED 3 LOSS" in ranks[0].output()
    assert_equal_files(tmp_path / "saved" / "expected.safetensors", tmp_path / "out" / "restored.safetensors")
    fetched = [int((tmp_path / "out" / f"fetched{r}.txt").read_text()) for r in range(2)]
    # About each byte once, by rank 0 (plus read-ahead windows of sequential small reads, and the
    # manifest once more for the retention pass after the restore); never once per rank.
    assert fetched[1] == 0 and total - manifest_bytes < fetched[0] < 1.1 * total, (fetched, total)
    assert steps(s3_run, verify=True) == [(3, True), (5, True)]  # training went on and saved again


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fsdp2_of_2_ranks_restored_on_4_from_the_bucket_each_rank_fetches_about_its_quarter(
        s3_server: S3Server, s3_run: S3Run, tmp_path: Path) -> None:
    env = s3_server.environment()
    run_ok(WORKER, ["fsdp-save", s3_run.url, tmp_path / "saved"], 2, tmp_path / "logs_save", env=env)
    total = stored_bytes(s3_server, s3_run, 3)
    ranks = run_ok(WORKER, ["fsdp-restore", s3_run.url, tmp_path / "out"], 4, tmp_path / "logs", env=env)
    assert "RESTORED 3 LOSS" in ranks[0].output()
    assert_equal_files(tmp_path / "saved" / "expected.safetensors", tmp_path / "out" / "restored.safetensors")
    fetched = [int((tmp_path / "out" / f"fetched{r}.txt").read_text()) for r in range(4)]
    assert all(0 < n < 0.35 * total for n in fetched), (fetched, total)


@pytest.mark.timeout(240)
def test_ddp_checkpoint_of_4_ranks_resumes_on_2_from_the_bucket(s3_server: S3Server, s3_run: S3Run,
                                                                 tmp_path: Path) -> None:
    env = s3_server.environment()
    before, after = tmp_path / "before", tmp_path / "after"
    run_ok(DDP, [s3_run.url, before, MID_EPOCH[4], "--sync"], 4, tmp_path / "logs_a", env=env, timeout=180)
    manifest = unbroken.read_info(f"{s3_run.url}/step_{MID_EPOCH[4]:09d}",
                                  storage_options=s3_run.storage_options).manifest
    assert manifest.world_size == 4
    ranks = run_ok(DDP, [s3_run.url, after, 1000, "--epochs", "1"], 2, tmp_path / "logs_b", env=env)
    assert f"START {MID_EPOCH[4]}" in ranks[0].output()
    saved, restored = load_file(str(before / "final.safetensors")), load_file(str(after / "restored.safetensors"))
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert sorted(samples(before, 4) + samples(after, 2)) == list(range(DATASET))  # each sample once


@pytest.mark.timeout(120)
def test_a_rank_killed_mid_upload_commits_nothing_and_cleanup_removes_its_upload_after_the_grace_period(
        s3_server: S3Server, s3_run: S3Run, tmp_path: Path) -> None:
    ranks = launch(WORKER, ["fault", s3_run.url], 2, tmp_path / "logs", env=s3_server.environment(),
                   rank_env={1: {"KILL_AT": "object.part:1:kill"}})
    codes = wait_all(ranks, timeout=90)
    out = ranks[0].output()
    assert codes == [0, -9], out
    assert "SAVED 1" in out and "RAISED DistributedError" in out and "died" in out, out
    assert steps(s3_run) == [(1, True)]  # step 2: not committed, not even listed

    state = {"model": nn.Linear(2048, 1024), "optimizer": None}
    state["optimizer"] = torch.optim.SGD(state["model"].parameters(), lr=0.1, momentum=0.9)
    record = unbroken.load(s3_run.url, state, rng=False, storage_options=s3_run.storage_options)
    assert record.step == 1

    client = s3_server.client()
    debris = client.list_multipart_uploads(Bucket=s3_run.bucket).get("Uploads", [])
    assert [u["Key"] for u in debris] == ["run/step_000000002/rank00001.safetensors"]  # rank 1's, unfinished
    storage = FsspecStorage(s3_run.url, s3_run.storage_options)
    # An hour later (moto dates every multipart upload 2010-11-10, so "too young" is not testable here).
    storage.clock = lambda: time.time() + storage.cleanup_grace_s + 60
    assert storage.cleanup() == ["step_000000002/rank00001.safetensors (incomplete upload)"]
    assert client.list_multipart_uploads(Bucket=s3_run.bucket).get("Uploads", []) == []
    assert "Contents" not in client.list_objects_v2(Bucket=s3_run.bucket, Prefix="run/step_000000002/")


def test_a_rank_reading_its_range_of_a_large_object_fetches_little_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank restoring its piece reads the file's length prefix and header, then its own ranges:
    the read-ahead of the small reads must not pull in the rest of the object."""
    pytest.importorskip("fsspec")
    storage = FsspecStorage(f"memory://unbroken-ranged-{uuid.uuid4().hex[:8]}")
    data = bytes(random.Random(0).randbytes(12 * MiB))
    staging = storage.begin("step_000000001")
    handle = staging.create("rank00000.safetensors")
    handle.write(memoryview(data))
    handle.close()
    staging.commit(b"{}")
    fetched: list[int] = []
    cat_file = storage.fs.cat_file

    def counting(path: str, start: int | None = None, end: int | None = None, **kw: object) -> bytes:
        got = cat_file(path, start=start, end=end, **kw)
        fetched.append(len(got))
        return bytes(got)

    monkeypatch.setattr(storage.fs, "cat_file", counting)
    wanted = [(0, 8), (8, 4000), (9 * MiB, MiB), (5 * MiB, 300_000)]  # prefix, header, two ranges
    with storage.open("step_000000001", "rank00000.safetensors") as reader:
        for offset, size in wanted:
            out = bytearray(size)
            reader.read_into(offset, memoryview(out))
            assert bytes(out) == data[offset:offset + size]
    assert sum(fetched) <= sum(size for _, size in wanted) + remote_files.READ_AHEAD, fetched


def test_an_upload_the_store_does_not_hold_whole_fails_the_save(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fsspec")
    storage = FsspecStorage(f"memory://unbroken-short-{uuid.uuid4().hex[:8]}")
    real = storage.fs.pipe_file
    monkeypatch.setattr(storage.fs, "pipe_file", lambda path, data, **kw: real(path, data[:-1], **kw))
    handle = storage.begin("step_000000001").create("rank00000.safetensors")
    handle.write(memoryview(b"x" * 100))
    with pytest.raises(unbroken.StorageError, match="holds 99 bytes after the upload, but 100 were sent"):
        handle.close()
