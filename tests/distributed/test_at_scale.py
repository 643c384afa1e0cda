"""The multi-rank protocol at many ranks, run in-process (one thread per rank, tests/distributed/threaded.py):
no step costs O(ranks²) requests, rank 0 never commits a manifest that readers refuse, rank 0 decodes
the ranks' reports with the garbage collector paused."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

import unbroken
from unbroken.checkpoint.single import build_manifest
from unbroken.distributed.world import World
from unbroken.manager.options import ManagerOptions
from unbroken.manager.rank_saver import DistributedSaver
from unbroken.manager.ranks import DistributedRun
from unbroken.state import capture
from unbroken.storage import LocalStorage, ReadHandle

from .threaded import ok, run_ranks

RANKS = 16


class CountingStorage(LocalStorage):
    """A rank's view of the run, counting the files it opens (each open is a GET of the header and
    more on object storage)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened: list[str] = []

    def open(self, name: str, file_name: str) -> ReadHandle:
        self.opened.append(file_name)
        return super().open(name, file_name)


def _model(seed: int) -> torch.nn.Module:
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(RANKS)])
    generator = torch.Generator().manual_seed(seed)  # the global generator is shared by the rank threads
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def _save(run: Path, world: World) -> None:
    state: dict[str, Any] = {"model": _model(0)}
    snap = capture(state, rng=False)
    saver = DistributedSaver(world, LocalStorage(run), False, None, lambda manifest: None, state)
    saver.save("step_000000001", 1, snap, build_manifest(snap, 1, None, None, world.size))
    saver.wait()
    saver.raise_if_failed()


def test_a_ddp_restore_by_default_opens_about_one_file_per_rank_not_every_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(run_ranks(RANKS, lambda world: _save(run, world)))
    assert len(list((run / "step_000000001").glob("rank*.safetensors"))) == RANKS
    expected = _model(0).state_dict()

    def restore(world: World) -> list[str]:
        storage = CountingStorage(run)
        state: dict[str, Any] = {"model": _model(1)}
        run_ = DistributedRun(world, ManagerOptions().restore_mode)  # the manager's default
        assert run_.restore(storage, state, strict=True, rng=False) is not None
        for key, value in state["model"].state_dict().items():
            assert torch.equal(value, expected[key]), key
        return storage.opened

    opened = ok(run_ranks(RANKS, restore))
    # direct reads: every rank opens all 16 files (256 opens, N²); here each file is read by one rank
    assert max(len(files) for files in opened) <= 2, opened
    assert sum(len(files) for files in opened) <= 2 * RANKS


def test_gather_json_decodes_with_the_collector_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    from unbroken.distributed import collectives

    seen: list[bool] = []
    real = collectives.json.loads

    def loads(text: str) -> Any:
        seen.append(gc.isenabled())
        return real(text)

    monkeypatch.setattr(collectives.json, "loads", loads)
    assert gc.isenabled()
    reports = ok(run_ranks(4, lambda world: world.saving.gather_json({"rank": world.rank, "layout": [[1, 2]]})))
    assert reports[0] == [{"rank": r, "layout": [[1, 2]]} for r in range(4)]
    assert seen and not any(seen)
    assert gc.isenabled()


def test_a_corrupt_file_read_for_every_rank_makes_every_rank_skip_the_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(run_ranks(RANKS, lambda world: _save(run, world)))
    victim = run / "step_000000001" / "rank00005.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF  # the last tensor's last byte: only its reader sees it, and broadcasts it
    victim.write_bytes(bytes(raw))

    def restore(world: World) -> object:
        return DistributedRun(world, "spread").restore(LocalStorage(run), {"model": _model(1)}, strict=True,
                                                       rng=False)

    with pytest.warns(unbroken.CheckpointSkippedWarning, match="rank 5") as caught:  # process-wide: every thread's
        assert ok(run_ranks(RANKS, restore)) == [None] * RANKS
    assert len(caught) == RANKS and all("checksum mismatch" in str(w.message) for w in caught)


def test_a_manifest_over_the_readers_caps_is_never_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 checks what readers accept before its commit: past a cap the save fails on every rank, with
    the limit and the fix, and nothing is committed (readers would refuse the checkpoint forever)."""
    from unbroken.format import manifest as manifest_module

    run = tmp_path / "run"
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 4096)
    results = run_ranks(4, lambda world: _save(run, world))
    assert all(isinstance(r, unbroken.StorageError) for r in results), results
    assert all("MAX_MANIFEST_BYTES" in str(r) and "Fix: fewer, larger tensors" in str(r) for r in results)
    assert unbroken.list_checkpoints(run) == []

    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 1 << 28)
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_CONTAINERS", 50)
    results = run_ranks(4, lambda world: _save(run, world))
    assert all("MAX_MANIFEST_CONTAINERS" in str(r) for r in results), results
    assert unbroken.list_checkpoints(run) == []


def test_a_single_process_save_over_the_readers_caps_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from unbroken.format import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 4096)
    with pytest.raises(unbroken.UnserializableStateError, match="MAX_MANIFEST_BYTES.*Fix: fewer, larger"):
        unbroken.save(tmp_path / "run" / "step_000000001", {"model": _model(0)}, step=1, rng=False)
    assert not (tmp_path / "run" / "step_000000001").exists()
