"""Two tiers across ranks with no shared filesystem: each rank (a node) saves into a node-local run
directory of its own, uploads its file to the ``mirror_to`` bucket in the background, and rank 0
commits the mirror's copy last (moto's S3 server, gloo ranks as subprocesses)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import unbroken
from tests.s3server import S3Run, S3Server
from unbroken.storage import FsspecStorage

from .harness import HERE, kill_all, launch, run_ok, wait_all, wait_for
from .test_ddp_resume import STEPS, assert_same_run

DDP = HERE / "ddp_worker.py"
TIERS = HERE / "tiers_worker.py"


def nodes(root: Path, world: int = 2) -> dict[int, dict[str, str]]:
    return {rank: {"NODE_DIR": str(root / f"node{rank}")} for rank in range(world)}


def committed(s3_run: S3Run) -> list[tuple[int, bool]]:
    """The mirror's checkpoints; none when the run has no object at all (a failed round's uploads
    were all removed by their ranks, which is as uncommitted as a run gets)."""
    try:
        records = unbroken.list_checkpoints(s3_run.url, verify=True, storage_options=s3_run.storage_options)
    except unbroken.CheckpointNotFoundError:
        return []
    return [(r.step, r.valid) for r in records]


@pytest.mark.timeout(240)
def test_ranks_restarted_on_empty_node_local_disks_resume_bitwise_from_the_mirror(
        s3_server: S3Server, s3_run: S3Run, tmp_path: Path) -> None:
    env = s3_server.environment()
    run_ok(DDP, [tmp_path / "ref_run", tmp_path / "ref", STEPS, "--batchnorm"], 2, tmp_path / "logs_ref")
    ranks = launch(TIERS, [s3_run.url, tmp_path / "out", STEPS, "--batchnorm"], 2, tmp_path / "logs_crash",
                   env={**env, "PAUSE_AT": "6"}, rank_env=nodes(tmp_path / "first"))
    wait_for(ranks, "MIRRORED 6\n", timeout=120)
    kill_all(ranks)
    assert committed(s3_run)[-1] == (6, True)
    for rank in range(2):  # each node holds its own rank's file of each checkpoint, and the manifest
        node = tmp_path / "first" / f"node{rank}" / "step_000000006"
        assert sorted(p.name for p in node.iterdir()) == ["manifest.json", f"rank0000{rank}.safetensors"]
    shutil.rmtree(tmp_path / "first")  # new machines: empty local disks

    resumed = run_ok(TIERS, [s3_run.url, tmp_path / "out", STEPS, "--batchnorm"], 2, tmp_path / "logs_resume",
                     env=env, rank_env=nodes(tmp_path / "second"))
    assert "START 6" in resumed[0].output()
    assert_same_run(tmp_path / "ref", tmp_path / "out", 2)
    assert [step for step, ok in committed(s3_run) if ok][-1] == STEPS  # close() waited for the last upload


@pytest.mark.timeout(180)
def test_a_rank_killed_during_its_upload_leaves_the_mirror_step_uncommitted_and_the_local_tier_intact(
        s3_server: S3Server, s3_run: S3Run, tmp_path: Path) -> None:
    rank_env = nodes(tmp_path)
    rank_env[1]["UNBROKEN_FAILPOINT"] = "object.put:1:kill"  # rank 1's first upload to the mirror
    ranks = launch(TIERS, [s3_run.url, tmp_path / "out", STEPS, "--sync"], 2, tmp_path / "logs",
                   env=s3_server.environment(), rank_env=rank_env)
    codes = wait_all(ranks, timeout=120)
    assert codes[1] == -9, ranks[1].output()
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_run.bucket, Prefix="run/").get("Contents", [])]
    assert not [k for k in keys if k.endswith("manifest.json")], keys  # rank 0 never committed the mirror's step
    assert all(not ok for _, ok in committed(s3_run))
    # Rank 0's own upload is removed by rank 0 when its round fails, unless its training (whose DDP
    # peer died) ended the process first: then, as for any dead rank, by cleanup after the grace period.
    storage = FsspecStorage(s3_run.url, s3_run.storage_options)
    storage.clock = lambda: time.time() + storage.cleanup_grace_s + 60
    storage.cleanup()
    assert "Contents" not in client.list_objects_v2(Bucket=s3_run.bucket, Prefix="run/step_")
    assert client.list_multipart_uploads(Bucket=s3_run.bucket).get("Uploads", []) == []
    for rank in range(2):  # the local tier holds step 2, committed before any upload began
        local = unbroken.list_checkpoints(tmp_path / f"node{rank}", verify=False)
        assert local and local[0].step == 2 and all(r.valid for r in local), (rank, local)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_same_path_on_two_nodes_is_found_node_local_and_saved_per_node_with_the_mirror(
        s3_server: S3Server, s3_run: S3Run, tmp_path: Path) -> None:
    """Rank 1 sees another directory under the same path (a mount namespace of its own): the ranks
    find out, and save per node with mirror_to, or refuse clearly without it."""
    same = {"NODE_DIR": str(tmp_path / "run")}
    rank_env = {0: same, 1: {**same, "PRIVATE_NODE_DIR": str(tmp_path / "node1")}}
    env = s3_server.environment()
    ranks = launch(TIERS, [s3_run.url, tmp_path / "out0", 2, "--sync"], 2, tmp_path / "logs0",
                   env={**env, "NO_MIRROR": "1"}, rank_env=rank_env)
    codes = wait_all(ranks, timeout=120)
    if 3 in codes:
        pytest.skip("cannot bind-mount in a private mount namespace here")
    assert codes == [0, 0] and "RAISED StorageError" in ranks[0].output(), ranks[0].output()
    assert "is not one directory shared by every rank" in ranks[1].output()

    run_ok(TIERS, [s3_run.url, tmp_path / "out", 4, "--sync"], 2, tmp_path / "logs", env=env, rank_env=rank_env)
    assert committed(s3_run) == [(2, True), (4, True)]
    for directory, rank in ((tmp_path / "run", 0), (tmp_path / "node1", 1)):
        names = sorted(p.name for p in (directory / "step_000000004").iterdir())
        assert names == ["manifest.json", f"rank0000{rank}.safetensors"]
