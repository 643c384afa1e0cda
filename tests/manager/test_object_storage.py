"""Checkpoints on a real S3 API (moto's server on 127.0.0.1, spoken to over HTTP by s3fs).

A run directory in the bucket, and the two-tier set-up (local disk + ``mirror_to``), including a
training process killed with SIGKILL and resumed on "another machine" (a fresh local directory)
from the bucket, bit-exactly.  Storage-level protocol tests are in tests/storage/test_remote.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import unbroken
from tests import helpers
from tests.helpers import wait_until
from tests.s3server import S3Run, S3Server
from unbroken.cli.main import main as cli_main

SCRIPT = Path(__file__).resolve().parents[1] / "preempt_train.py"
make_state = partial(helpers.make_state, sizes=(8, 16, 2))


def train_steps(state: dict, steps: int) -> None:
    for _ in range(steps):
        loss = state["model"](torch.randn(4, 8)).pow(2).mean()
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()


def weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["model"].state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def remote_steps(s3_run: S3Run, run: str | None = None) -> list[int]:
    try:
        records = unbroken.list_checkpoints(run or s3_run.url, storage_options=s3_run.storage_options)
    except unbroken.CheckpointNotFoundError:  # nothing uploaded yet
        return []
    return [r.step for r in records if r.valid]


def test_a_run_directory_in_the_bucket(s3_run: S3Run) -> None:
    state = make_state()
    ckpt = unbroken.CheckpointManager(s3_run.url, state, every_steps=2, keep_last=2,
                                      storage_options=s3_run.storage_options)
    for step in range(1, 7):
        train_steps(state, 1)
        state["epoch"] = step
        ckpt.step(step)
    saved = weights(state)
    ckpt.close()
    assert remote_steps(s3_run) == [4, 6]  # retention ran in the bucket
    fresh = make_state(1)
    again = unbroken.CheckpointManager(s3_run.url, fresh, storage_options=s3_run.storage_options)
    assert again.restore() == 6 and fresh["epoch"] == 6 and same(weights(fresh), saved)
    again.close()


def test_two_tiers_keep_their_own_retention_and_a_new_machine_restores_from_the_bucket(
        s3_run: S3Run, tmp_path: Path) -> None:
    state = make_state()
    ckpt = unbroken.CheckpointManager(tmp_path / "machine-a", state, every_steps=1, keep_last=2,
                                      mirror_to=s3_run.url, mirror_options=s3_run.storage_options,
                                      mirror_keep_last=3)
    for step in range(1, 7):
        train_steps(state, 1)
        ckpt.step(step)
    saved = weights(state)
    ckpt.close()  # waits for the last upload
    assert [r.step for r in unbroken.list_checkpoints(tmp_path / "machine-a")] == [5, 6]
    # A commit arriving during an upload replaces the waiting one, so which older steps made it up
    # depends on timing; the newest always does, and retention holds there.
    uploaded = remote_steps(s3_run)
    assert uploaded[-1] == 6 and len(uploaded) <= 3, uploaded
    fresh = make_state(1)
    other = unbroken.CheckpointManager(tmp_path / "machine-b", fresh, mirror_to=s3_run.url,
                                       mirror_options=s3_run.storage_options)
    assert other.restore() == 6 and same(weights(fresh), saved)
    other.close()
    assert [r.step for r in unbroken.list_checkpoints(tmp_path / "machine-b", verify=True)] == [6]


def test_killed_on_one_machine_resumed_bit_exactly_on_another_from_the_bucket(
        s3_run: S3Run, tmp_path: Path) -> None:
    env = {**os.environ, "UNBROKEN_TEST_STORAGE_OPTIONS": json.dumps(s3_run.storage_options)}
    mirror = ["--mirror", s3_run.url]
    reference = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "reference"), "40"],
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "machine-a"), "40", "--sleep", "0.05",
                             "--async", *mirror], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: len(remote_steps(s3_run)) >= 2 or proc.poll() is not None, timeout=120,
                   what="two uploaded steps")
    finally:
        proc.kill()  # SIGKILL; unlike os.kill, never a reused pid once the process was reaped
    proc.communicate(timeout=30)
    uploaded = remote_steps(s3_run)
    assert uploaded and max(uploaded) < 40, f"the kill came too late to test anything: {uploaded}"
    resumed = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "machine-b"), "40", *mirror],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    start = int(resumed.stdout.split("START ")[1].split()[0])
    assert start >= max(uploaded) - 1 and start > 0  # the newest upload (one may have landed after the listing)
    done = [line for line in resumed.stdout.splitlines() if line.startswith("DONE")]
    assert done == [line for line in reference.stdout.splitlines() if line.startswith("DONE")]
    assert s3_run.storage_options["secret"] not in resumed.stderr + resumed.stdout


def test_an_unreachable_bucket_never_stops_training_and_the_next_commit_uploads(
        s3_run: S3Run, s3_server: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from unbroken.manager import mirror as mirror_module

    state = make_state()
    ckpt = unbroken.CheckpointManager(tmp_path / "local", state, every_steps=1, async_save=False,
                                      mirror_to=s3_run.url, mirror_options=s3_run.storage_options)
    ckpt._mirror.backoff = 0  # type: ignore[union-attr]  # retries at once: that they fail is what counts here
    ckpt.step(1)
    assert ckpt._mirror.wait(60)  # type: ignore[union-attr]
    s3_server.stop()
    try:
        train_steps(state, 1)
        ckpt.step(2)  # returns at once: the upload fails in the background
        assert ckpt._mirror.wait(120)  # type: ignore[union-attr]
        assert isinstance(ckpt._mirror.last_error, OSError)  # type: ignore[union-attr]
        assert "mirror: upload of step_000000002" in caplog.text and "the local checkpoint is kept" in caplog.text
        assert [r.step for r in unbroken.list_checkpoints(tmp_path / "local", verify=True)] == [1, 2]
    finally:
        s3_server.start()
    train_steps(state, 1)
    ckpt.step(3)
    ckpt.close()
    assert remote_steps(s3_run) == [1, 3]
    assert mirror_module.MAX_ATTEMPTS >= 2
    assert s3_run.storage_options["secret"] not in caplog.text


def upload_two_steps(s3_run: S3Run, tmp_path: Path) -> dict[str, torch.Tensor]:
    state = make_state()
    ckpt = unbroken.CheckpointManager(tmp_path / "a", state, every_steps=1, mirror_to=s3_run.url,
                                      mirror_options=s3_run.storage_options)
    train_steps(state, 1)
    ckpt.step(1)
    first = weights(state)
    ckpt.wait()
    ckpt._mirror.wait(60)  # type: ignore[union-attr]  # step 1 is uploaded before step 2 is saved
    train_steps(state, 1)
    ckpt.step(2)
    ckpt.close()
    assert remote_steps(s3_run) == [1, 2]
    return first


def test_a_data_object_deleted_after_commit_is_never_used(s3_run: S3Run, s3_server: S3Server, tmp_path: Path) -> None:
    first = upload_two_steps(s3_run, tmp_path)
    s3_server.client().delete_object(Bucket=s3_run.bucket, Key="run/step_000000002/rank00000.safetensors")
    fresh = make_state(1)
    other = unbroken.CheckpointManager(tmp_path / "b", fresh, mirror_to=s3_run.url,
                                       mirror_options=s3_run.storage_options)
    with pytest.warns(unbroken.CheckpointSkippedWarning, match="step_000000002.*rank00000.safetensors"):
        assert other.restore() == 1
    assert same(weights(fresh), first)
    other.close()


def test_a_data_object_of_the_wrong_size_is_never_used(s3_run: S3Run, s3_server: S3Server, tmp_path: Path) -> None:
    first = upload_two_steps(s3_run, tmp_path)
    client, key = s3_server.client(), "run/step_000000002/rank00000.safetensors"
    body = client.get_object(Bucket=s3_run.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_run.bucket, Key=key, Body=body + b"\0" * 8)
    fresh = make_state(1)
    other = unbroken.CheckpointManager(tmp_path / "b", fresh, mirror_to=s3_run.url,
                                       mirror_options=s3_run.storage_options)
    with pytest.warns(unbroken.CheckpointSkippedWarning, match="bytes but the manifest says"):
        assert other.restore() == 1
    assert same(weights(fresh), first)
    assert not (tmp_path / "b" / "step_000000002").exists()  # the bad download was removed
    other.close()


def test_one_shot_save_and_load_on_a_url(s3_run: S3Run) -> None:
    state = make_state()
    unbroken.save(f"{s3_run.url}/ck", state, step=5, storage_options=s3_run.storage_options)
    fresh = make_state(1)
    record = unbroken.load(f"{s3_run.url}/ck", fresh, storage_options=s3_run.storage_options)
    assert record.step == 5 and same(weights(fresh), weights(state))
    with pytest.raises(unbroken.CheckpointExistsError):
        unbroken.save(f"{s3_run.url}/ck", state, storage_options=s3_run.storage_options)


def cli(capsys: pytest.CaptureFixture[str], s3_run: S3Run, *args: str) -> tuple[int, str]:
    options = [f"-o{k}={json.dumps(v)}" for k, v in s3_run.storage_options.items()]
    code = cli_main([*args, *options])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_ls_show_verify_prune_and_cp_on_urls(s3_run: S3Run, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    state = make_state()
    ckpt = unbroken.CheckpointManager(s3_run.url, state, every_steps=1, storage_options=s3_run.storage_options)
    for step in range(1, 5):
        ckpt.step(step, metrics={"loss": 1.0 / step})
    ckpt.close()
    code, out = cli(capsys, s3_run, "ls", s3_run.url)
    assert code == 0 and all(f"\n{s} " in out for s in range(1, 5)), out
    code, out = cli(capsys, s3_run, "show", f"{s3_run.url}/step_000000004")
    assert code == 0 and "model" in out and "F32" in out
    code, out = cli(capsys, s3_run, "verify", s3_run.url)
    assert code == 0 and "4 valid, 0 corrupt" in out
    code, out = cli(capsys, s3_run, "cp", s3_run.url, str(tmp_path / "copy"), "--no-progress")
    assert code == 0 and out.count("copied") == 4
    code, out = cli(capsys, s3_run, "cp", s3_run.url, str(tmp_path / "copy"), "--no-progress")
    assert code == 0 and out.count("present") == 4  # idempotent
    assert [r.step for r in unbroken.list_checkpoints(tmp_path / "copy", verify=True)] == [1, 2, 3, 4]
    code, out = cli(capsys, s3_run, "prune", s3_run.url, "--keep-last", "2", "--dry-run")
    assert code == 0 and "would delete" in out and remote_steps(s3_run) == [1, 2, 3, 4]
    code, out = cli(capsys, s3_run, "prune", s3_run.url, "--keep-last", "2")
    assert code == 0 and remote_steps(s3_run) == [3, 4]
    assert s3_run.storage_options["secret"] not in out


def test_cli_reports_a_bad_option_and_a_missing_checkpoint(s3_run: S3Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["ls", s3_run.url, "-o", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    code, out = cli(capsys, s3_run, "show", f"{s3_run.url}/step_000000009")
    assert code == 2 and "no such run" in out
