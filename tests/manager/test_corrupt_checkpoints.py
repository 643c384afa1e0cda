"""A corrupt, vanished or misnamed checkpoint never costs a good one (issue 14 of the red team's findings).

Each test keeps one promise: the manager quarantines what it finds corrupt instead of counting it,
retention never deletes the newest checkpoint known good in this process, ``prune`` checks the
checkpoint it keeps, a failed save (or a failed retention pass after a commit) is reported as what it
is, and a checkpoint whose name and manifest disagree is refused before any live object changes.
"""

from __future__ import annotations

import errno
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

import unbroken
from tests import helpers
from tests.mounts import bind_mount, tmpfs
from tests.s3server import S3Run, S3Server
from unbroken import CheckpointManager, CheckpointSkippedWarning, CorruptCheckpointError
from unbroken.cli.main import main as cli_main

make_state = partial(helpers.make_state, sizes=(4, 8, 1))


def save_steps(run: Path, steps: tuple[int, ...], seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Commit ``steps`` in a run with no retention (a run killed before its retention pass leaves the
    same); the model weights of each step."""
    state = make_state(seed)
    saved = {}
    with CheckpointManager(run, state, async_save=False) as ckpt:
        for step in steps:
            helpers.train(state["model"], state["optimizer"], steps=1, seed=step)
            ckpt.save(step)
            saved[step] = weights(state)
    return saved


def weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["model"].state_dict().items()}


def flip_tensor_byte(checkpoint: Path) -> None:
    """Flip the last byte of a tensor file: its manifest stays valid, only reading every byte shows it."""
    (data,) = [p for p in checkpoint.iterdir() if p.name != "manifest.json"]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.write_bytes(bytes(raw))


def quarantined(run: Path, step: int) -> list[Path]:
    return sorted(run.glob(f"corrupt-step_{step:09d}-*"))


def steps_on_disk(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step_*"))


def test_retention_never_deletes_the_only_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    saved = save_steps(run, (10, 20))
    flip_tensor_byte(run / "step_000000020")
    state = make_state(99)
    ckpt = CheckpointManager(run, state, keep_last=1, async_save=False)
    with pytest.warns(CheckpointSkippedWarning, match="step_000000020"):
        assert ckpt.restore() == 10
    assert steps_on_disk(run) == [10]  # the retention pass after the fallback kept the restored step
    helpers.assert_exactly_equal(weights(state), saved[10])
    ckpt.close()
    # The next restart resumes from the same good checkpoint, not from scratch.
    with CheckpointManager(run, make_state(98), keep_last=1) as again:
        assert again.restore() == 10


def test_a_corrupt_checkpoint_is_quarantined_and_its_step_saved_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_steps(run, (10, 20))
    flip_tensor_byte(run / "step_000000020")
    damaged = (run / "step_000000020" / "manifest.json").read_bytes()
    state = make_state(99)
    ckpt = CheckpointManager(run, state, keep_last=1, every_steps=10, async_save=False)
    with pytest.warns(CheckpointSkippedWarning):
        assert ckpt.restore() == 10
    (moved,) = quarantined(run, 20)
    assert (moved / "manifest.json").read_bytes() == damaged  # kept as it was, for inspection
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already exists; not overwritten"
        assert ckpt.step(20) is True
    ckpt.close()
    assert steps_on_disk(run) == [20]  # the new step 20 is verified good: the old one may go
    assert [r.step for r in unbroken.list_checkpoints(run, verify=True) if r.valid] == [20]
    assert quarantined(run, 20) == [moved]  # never counted by retention


def test_retention_keeps_the_checkpoint_it_restored_when_a_corrupt_one_cannot_be_moved(tmp_path: Path) -> None:
    """Quarantine fails (the corrupt directory is a mount point: rename gives EBUSY): the corrupt step
    stays and looks newest to retention, but the step restored in this process is never deleted."""
    run = tmp_path / "run"
    save_steps(run, (10, 20))
    flip_tensor_byte(run / "step_000000020")
    with bind_mount(run / "step_000000020"):
        ckpt = CheckpointManager(run, make_state(99), keep_last=1, async_save=False)
        with pytest.warns(RuntimeWarning) as warned:
            assert ckpt.restore() == 10
        assert any("could not quarantine" in str(w.message) for w in warned)
        assert steps_on_disk(run) == [10, 20]
        ckpt.close()


def test_prune_never_deletes_the_only_good_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    save_steps(run, (10, 20))
    flip_tensor_byte(run / "step_000000020")
    assert cli_main(["prune", str(run), "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 10" not in out and steps_on_disk(run) == [10, 20], out
    result = unbroken.prune(run, keep_last=1, invalid=True)
    assert [r.step for r in result.deleted] == [20] and steps_on_disk(run) == [10]


def test_a_quarantined_checkpoint_is_listed_and_removed_by_prune_invalid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    save_steps(run, (10, 20))
    flip_tensor_byte(run / "step_000000020")
    with CheckpointManager(run, make_state(99)) as ckpt, pytest.warns(CheckpointSkippedWarning):
        ckpt.restore()
    (moved,) = quarantined(run, 20)
    cli_main(["ls", str(run)])
    out = capsys.readouterr().out
    assert moved.name in out and "quarantined" in out, out
    result = unbroken.prune(run, invalid=True)
    assert moved.name in result.removed_quarantined and not quarantined(run, 20) and steps_on_disk(run) == [10]


def test_a_checkpoint_named_for_another_step_is_refused_before_any_live_object_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    saved = save_steps(run, (1,))
    unbroken.save(tmp_path / "elsewhere", make_state(5), step=0)
    (tmp_path / "elsewhere").rename(run / "step_000000005")  # names step 5, holds step 0

    assert cli_main(["verify", str(run)]) == 1
    assert "1 valid, 1 corrupt" in capsys.readouterr().out
    state = make_state(99)
    before = weights(state)
    ckpt = CheckpointManager(run, state)
    with pytest.raises(CorruptCheckpointError, match="named for step 5 but its manifest says step 0"):
        ckpt.restore(step=5)
    helpers.assert_exactly_equal(weights(state), before)  # refused before anything was loaded
    with pytest.warns(CheckpointSkippedWarning, match="named for step 5"):
        assert ckpt.restore() == 1
    helpers.assert_exactly_equal(weights(state), saved[1])
    ckpt.close()


def test_on_save_error_warn_holds_when_the_disk_fills_up(tmp_path: Path) -> None:
    """A 1 MB model on a 2 MB tmpfs: the second background save fails with ENOSPC.  Training goes on
    with warnings; the failure is never raised by the next save or by close()."""
    with tmpfs(tmp_path / "small", size="2m") as mount:
        state = {"model": torch.nn.Linear(512, 512)}
        ckpt = CheckpointManager(mount / "run", state, every_steps=1, keep_last=1, on_save_error="warn")
        with pytest.warns(RuntimeWarning, match="training continues") as warned:
            for step in range(1, 6):
                ckpt.step(step)
            ckpt.close()
        assert any("No space left" in str(w.message) for w in warned)
        assert [r.step for r in unbroken.list_checkpoints(mount / "run", verify=True) if r.valid]


def test_a_committed_save_stays_committed_when_retention_fails_after_it(tmp_path: Path) -> None:
    """The listing for retention fails (a store answering 503): the commit stands, the retention
    failure is its own warning, and close() does not try to save the committed step again."""
    fs = _flaky_listing()
    url = f"{fs.protocol}://run-{tmp_path.name}"
    state = make_state()
    ckpt = CheckpointManager(url, state, every_steps=1, keep_last=1, async_save=False)
    ckpt.step(1)
    fs.fail_listing = True
    with pytest.warns(RuntimeWarning, match="retention after the commit of step 2 failed") as warned:
        assert ckpt.step(2) is True
    assert not any("checkpoint for step 2 failed" in str(w.message) for w in warned)
    ckpt.close()  # no CheckpointExistsError: step 2 is committed
    fs.fail_listing = False
    assert [r.step for r in unbroken.list_checkpoints(url, verify=True) if r.valid] == [1, 2]


def _flaky_listing() -> Any:
    """A ``memory://`` store whose run listing can be made to fail like an S3 endpoint answering 503
    (the store is faked, never the code under test)."""
    memory = pytest.importorskip("fsspec.implementations.memory")
    import fsspec

    class FlakyListing(memory.MemoryFileSystem):  # type: ignore[misc]
        protocol = "flakylisting"
        fail_listing = False

        @classmethod
        def _strip_protocol(cls, path: str) -> str:
            return str(super()._strip_protocol(path.removeprefix(f"{cls.protocol}://")))

        def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
            if type(self).fail_listing and path.strip("/").count("/") == 0:  # the run itself, not a step
                raise OSError(errno.EIO, "503 Service Unavailable (listing)")
            return super().ls(path, detail=detail, **kwargs)

    fsspec.register_implementation(FlakyListing.protocol, FlakyListing, clobber=True)
    return FlakyListing


# -- on object storage (moto's S3 server on 127.0.0.1) ------------------------------------------------

def test_on_save_error_warn_holds_when_the_store_is_unreachable(s3_run: S3Run, s3_server: S3Server) -> None:
    state = make_state()
    ckpt = CheckpointManager(s3_run.url, state, every_steps=1, async_save=False, on_save_error="warn",
                             storage_options=s3_run.storage_options)
    ckpt.step(1)
    s3_server.stop()
    try:
        with pytest.warns(RuntimeWarning, match="checkpoint for step 2 failed, training continues"):
            assert ckpt.step(2) is False
        with pytest.warns(RuntimeWarning, match="checkpoint for step 3 failed, training continues"):
            assert ckpt.step(3) is False
    finally:
        s3_server.start()
    assert ckpt.step(4) is True
    ckpt.close()
    records = unbroken.list_checkpoints(s3_run.url, verify=True, storage_options=s3_run.storage_options)
    assert [r.step for r in records if r.valid] == [1, 4]


def corrupt_object(s3_server: S3Server, s3_run: S3Run, prefix: str) -> None:
    """Flip the last byte of the checkpoint's tensor object, behind the code under test's back."""
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_run.bucket, Prefix=prefix)["Contents"]]
    (key,) = [k for k in keys if not k.endswith("manifest.json")]
    raw = bytearray(client.get_object(Bucket=s3_run.bucket, Key=key)["Body"].read())
    raw[-1] ^= 0x10
    client.put_object(Bucket=s3_run.bucket, Key=key, Body=bytes(raw))


def test_a_corrupt_checkpoint_in_a_bucket_is_quarantined_and_its_step_saved_again(
        s3_run: S3Run, s3_server: S3Server) -> None:
    options = s3_run.storage_options
    with CheckpointManager(s3_run.url, make_state(), async_save=False, storage_options=options) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
    corrupt_object(s3_server, s3_run, "run/step_000000002/")
    ckpt = CheckpointManager(s3_run.url, make_state(9), every_steps=1, keep_last=1, async_save=False,
                             storage_options=options)
    with pytest.warns(CheckpointSkippedWarning, match="step_000000002"):
        assert ckpt.restore() == 1
    listing = s3_server.client().list_objects_v2(Bucket=s3_run.bucket, Prefix="run/")["Contents"]
    moved = {o["Key"].split("/")[1] for o in listing if o["Key"].split("/")[1].startswith("corrupt-step_000000002-")}
    assert len(moved) == 1, listing
    assert ckpt.step(2) is True  # the step is free again
    ckpt.close()
    records = unbroken.list_checkpoints(s3_run.url, verify=True, storage_options=options)
    assert [r.step for r in records if r.valid] == [2]


def test_a_corrupt_local_checkpoint_is_replaced_by_the_mirrors_valid_copy(s3_run: S3Run, tmp_path: Path) -> None:
    run = tmp_path / "local"
    state = make_state()
    with CheckpointManager(run, state, async_save=False, mirror_to=s3_run.url,
                           mirror_options=s3_run.storage_options) as ckpt:
        ckpt.save(1)
        assert ckpt._mirror is not None and ckpt._mirror.wait(60)
        helpers.train(state["model"], state["optimizer"], steps=1, seed=2)
        ckpt.save(2)
    newest = weights(state)
    flip_tensor_byte(run / "step_000000002")
    state = make_state(9)
    with CheckpointManager(run, state, mirror_to=s3_run.url, mirror_options=s3_run.storage_options) as ckpt:
        with pytest.warns(CheckpointSkippedWarning, match="step_000000002"):
            assert ckpt.restore() == 2  # the bucket's copy, not the older local step 1
    helpers.assert_exactly_equal(weights(state), newest)
    assert len(quarantined(run, 2)) == 1
    assert [r.step for r in unbroken.list_checkpoints(run, verify=True) if r.valid] == [1, 2]


def test_verify_quarantine_sets_aside_what_verify_found_corrupt(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    save_steps(run, (10, 20, 30))
    flip_tensor_byte(run / "step_000000020")
    assert cli_main(["verify", str(run)]) == 1  # plain verify reads, never moves
    assert steps_on_disk(run) == [10, 20, 30]
    capsys.readouterr()
    assert cli_main(["verify", str(run), "--quarantine"]) == 1
    out = capsys.readouterr().out
    (moved,) = quarantined(run, 20)
    assert f"quarantined step 20 as {moved.name}" in out and steps_on_disk(run) == [10, 30], out
    assert cli_main(["verify", str(run)]) == 0
    with CheckpointManager(run, make_state()), pytest.raises(unbroken.RunLockedError):
        unbroken.quarantine_corrupt(run)  # never under a live manager
