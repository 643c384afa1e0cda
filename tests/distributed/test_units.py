"""In-process checks of the distributed building blocks: block checksums, the 1.2 manifest fields
(and crafted ones), writer assignment, joined staging areas, the data re-split policy, and a
crafted sharded checkpoint whose pieces overlap or leave gaps."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path

import pytest
import torch

import unbroken
from unbroken import CorruptCheckpointError, ResumableSampler, StateMismatchError
from unbroken.distributed.collectives import Comm
from unbroken.distributed.roles import assign_writers
from unbroken.format import FileEntry, Manifest, ShardedTensor, ShardEntry, TensorEntry, seal
from unbroken.io.checksum import BlockCrc, crc32c, crc32c_combine
from unbroken.storage import FsspecStorage, LocalStorage


@pytest.mark.parametrize("size", [0, 1, 4095, 1 << 16, (1 << 16) + 1, 5 * (1 << 16) + 77])
def test_block_crcs_and_their_combination_match_direct_crcs(size: int) -> None:
    data = os.urandom(size)
    for cut in (0, size // 3, size):
        assert crc32c_combine(crc32c(data[:cut]), crc32c(data[cut:]), size - cut) == crc32c(data)
    blocks = BlockCrc(1 << 16)
    for start in range(0, size, 10_000):
        blocks.update(memoryview(data[start:start + 10_000]))
    whole, per_block = blocks.finish()
    assert whole == crc32c(data)
    assert list(per_block) == [crc32c(data[i:i + (1 << 16)]) for i in range(0, size, 1 << 16)]


def _manifest(**changes: object) -> Manifest:
    tensors = {"a@0": TensorEntry("rank00000.safetensors", "F32", (2, 3), 80, 104, 1),
               "a@1": TensorEntry("rank00001.safetensors", "F32", (1, 3), 80, 92, 2, 8, (5, 6))}
    sharded = {"model/a": ShardedTensor("F32", (3, 3), (ShardEntry("a@0", (0, 0), (2, 3)),
                                                         ShardEntry("a@1", (2, 0), (1, 3))), ("S(0)",), (2,))}
    base: dict[str, object] = dict(step=3, created=1.0, world_size=2, versions={}, files={
        "rank00000.safetensors": FileEntry(104, 7), "rank00001.safetensors": FileEntry(92, 8)},
        tensors=tensors, state={"model": {"kind": "module", "value": {"a": {"__tensor__": "model/a"}}}},
        sharded=sharded, rank_state=[{"epoch": {"kind": "value", "value": 1}}] * 2)
    base.update(changes)
    return Manifest(**base)  # type: ignore[arg-type]


def test_manifest_1_2_fields_round_trip() -> None:
    manifest = _manifest()
    again = Manifest.from_json(manifest.to_json(), "test")
    assert again.sharded == manifest.sharded and again.rank_state == manifest.rank_state
    assert again.tensors == manifest.tensors and again.format_version == "1.2"


def _crafted(edit: object) -> bytes:
    doc = json.loads(_manifest().to_json())
    del doc["manifest_crc32c"]
    edit(doc)  # type: ignore[operator]
    return seal(json.dumps(doc).encode()[:-1])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["sharded"]["model/a"]["shards"][1].update(offsets=[3, 0]), "outside"),
    (lambda d: d["sharded"]["model/a"]["shards"][1].update(tensor="nope"), "not a listed"),
    (lambda d: d["sharded"]["model/a"].update(dtype="F64"), "not a listed"),
    (lambda d: d["sharded"].update({"a@0": d["sharded"]["model/a"]}), "both a tensor and a sharded"),
    (lambda d: d["tensors"]["a@1"].update(block_crc32c=[5]), "block checksums"),
    (lambda d: d["tensors"]["a@1"].update(block_bytes=0), "malformed block"),
    (lambda d: d.update(rank_state=[{}]), "one object per rank"),
])
def test_crafted_1_2_fields_are_refused(edit: object, message: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=message):
        Manifest.from_json(_crafted(edit), "crafted")


def test_older_manifests_without_the_new_fields_still_read() -> None:
    doc = json.loads(_manifest(sharded={}, rank_state=None,
                               tensors={}, files={}).to_json())
    assert "sharded" not in doc and "rank_state" not in doc
    doc.pop("manifest_crc32c")
    doc["format_version"] = "1.1"
    assert Manifest.from_json(seal(json.dumps(doc).encode()[:-1]), "old").rank_state is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["sharded"]["model/a"].update(shape=[2**20, 2**20]), "hold 9 elements, not the 1099511627776"),
    (lambda d: d["sharded"]["model/a"]["shards"][1].update(offsets=[1, 0]), "overlap"),
    (lambda d: (d["sharded"]["model/a"].update(shape=[4, 3]),
                d["sharded"]["model/a"]["shards"][1].update(tensor="a@0", offsets=[2, 0], shape=[2, 3])),
     "'a@0' is stored for two shards"),
    (lambda d: d["tensors"]["a@0"].update(offsets=[80, 108]), "F32[2, 3], 24 bytes, but its offsets [80, 108) hold 28"),
], ids=["larger-than-its-pieces", "overlapping-pieces", "one-stored-tensor-twice", "bytes-not-its-shape"])
def test_a_sharded_tensor_is_never_larger_than_the_bytes_stored_for_it(edit: object, message: str) -> None:
    """Every size a reader allocates for a sharded tensor is checked against its pieces when the
    manifest is read: a 12 KB manifest must not be able to declare a terabyte."""
    with pytest.raises(CorruptCheckpointError, match=re.escape(message)):
        Manifest.from_json(_crafted(edit), "crafted")


def _tiled(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], whole: tuple[int, ...]) -> bytes:
    """The manifest of a sharded F32 tensor ``whole`` stored as one tensor per box."""
    tensors, at = {}, 80
    for i, (_, shape) in enumerate(boxes):
        nbytes = math.prod(shape) * 4
        tensors[f"p{i}"] = TensorEntry("rank00000.safetensors", "F32", shape, at, at + nbytes, 0)
        at += nbytes
    shards = tuple(ShardEntry(f"p{i}", offsets, shape) for i, (offsets, shape) in enumerate(boxes))
    return _manifest(world_size=1, rank_state=None, files={"rank00000.safetensors": FileEntry(at, 0)},
                     tensors=tensors, sharded={"model/a": ShardedTensor("F32", whole, shards)}).to_json()


def test_many_pieces_are_checked_on_the_grid_their_boundaries_make() -> None:
    grid = [((r, c), (1, 2)) for r in range(12) for c in (0, 2, 4)]  # 36 pieces: more than are compared pairwise
    assert len(Manifest.from_json(_tiled(grid, (12, 6)), "grid").sharded["model/a"].shards) == 36
    twice = grid[:-1] + [((0, 0), (1, 2))]  # the last cell's piece moved onto the first: as many elements
    with pytest.raises(CorruptCheckpointError, match=r"the pieces at \[0, 0\]\+\[1, 2\] and at \[0, 0\]"):
        Manifest.from_json(_tiled(twice, (12, 6)), "overlap")
    # Bricks: each row's pieces start one column later than the row above's, so their boundaries cut the
    # whole into 8 cells per piece.  They cover it exactly, but no DTensor layout looks like this.
    starts = [sorted({0, *range(r, 64, 8)}) + [64] for r in range(8)]
    bricks = [((r, a), (1, b - a)) for r, row in enumerate(starts) for a, b in zip(row, row[1:])]
    with pytest.raises(CorruptCheckpointError, match="do not form a grid"):
        Manifest.from_json(_tiled(bricks, (8, 64)), "bricks")


def test_replicated_tensors_are_spread_evenly_and_deterministically() -> None:
    sizes = [(f"t{i}", 1000 - i * 10) for i in range(40)]
    owner = assign_writers(sizes, 4)
    assert owner == assign_writers(list(reversed(sizes)), 4)
    load = [sum(n for name, n in sizes if owner[name] == r) for r in range(4)]
    assert max(load) - min(load) <= 1000


def test_parameters_and_optimizer_state_are_spread_and_every_buffer_is_written_by_rank_0() -> None:
    from unbroken.distributed.rankplan import parameter_tensors, plan_rank
    from unbroken.state import capture

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 64))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    live = {"model": torch.nn.DataParallel(model), "optimizer": opt}  # a wrapper, unwrapped as DDP is
    snap = capture(live, rng=False)
    params = parameter_tensors(live, snap)
    assert params == {f"model/{n}" for n, _ in model.named_parameters()}
    plans = [plan_rank(snap, rank, 3, params) for rank in range(3)]
    owners = {name: plan.rank for plan in plans for name in plan.tensors}
    assert sorted(owners) == sorted(snap.tensors)  # each written once
    buffers = [f"model/{n}" for n, _ in model.named_buffers()]
    assert buffers and all(owners[n] == 0 for n in buffers)
    spread = [n for n in snap.tensors if n not in buffers]  # parameters and optimizer state
    assert {owners[n] for n in spread} == {0, 1, 2} and {owners[n] for n in params} != {0}
    assert plans[0].layout == plans[2].layout and plans[0].digest() == plans[2].digest()
    # Without the live modules, parameters cannot be told from buffers: every module tensor is rank 0's.
    cautious = [plan_rank(snap, rank, 3) for rank in range(3)]
    assert set(cautious[0].tensors) >= {f"model/{n}" for n, _ in model.state_dict().items()}


def test_a_single_process_comm_is_the_identity() -> None:
    comm = Comm(None, 0, 1)
    assert comm.broadcast_json({"a": 1}) == {"a": 1} and comm.all_gather_json([2]) == [[2]]
    assert comm.gather_json("x") == ["x"] and comm.any_true(True) is True


def test_a_joined_staging_area_is_committed_only_by_its_creator(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    staging = storage.begin("step_000000001")
    joined = storage.join("step_000000001", staging.token)
    own, theirs = staging.create("rank00000.safetensors"), joined.create("rank00001.safetensors")
    for handle in (own, theirs):
        handle.write(memoryview(b"x"))
        handle.close()
    with pytest.raises(RuntimeError, match="committed by the process that began it"):
        joined.commit(b"{}")
    joined.abort()  # removes only the joiner's file
    assert sorted(os.listdir(staging.path)) == ["rank00000.safetensors"]  # type: ignore[attr-defined]
    staging.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="invalid staging token"):
        storage.join("step_000000001", "../../etc")
    with pytest.raises(unbroken.StorageError, match="does not exist"):
        storage.join("step_000000001", "0123456789ab")


def test_ranks_share_a_step_on_object_storage_and_only_its_beginner_commits() -> None:
    pytest.importorskip("fsspec")
    storage = FsspecStorage(f"memory://unbroken-join-{uuid.uuid4().hex[:8]}")
    assert storage.shares_staging
    staging = storage.begin("step_000000001")
    joined = storage.join("step_000000001", staging.token)
    for area, file in ((staging, "rank00000.safetensors"), (joined, "rank00001.safetensors")):
        handle = area.create(file)
        handle.write(memoryview(b"x"))
        handle.close()
    with pytest.raises(RuntimeError, match="committed by the process that began it"):
        joined.commit(b"{}")
    joined.abort()  # removes only the joiner's object
    assert sorted(storage._objects(storage.path("step_000000001"))) == [
        storage.path("step_000000001", "rank00000.safetensors")]
    staging.abort()
    assert storage.names() == []
    with pytest.raises(ValueError, match="invalid staging token"):
        storage.join("step_000000001", "../../etc")


@pytest.mark.parametrize("saved_world, world, consumed", [(2, 3, 3), (4, 2, 2), (3, 1, 5), (1, 4, 8), (2, 2, 4)])
def test_the_rest_of_the_epoch_is_re_split_without_repeats_or_gaps(saved_world: int, world: int,
                                                                    consumed: int) -> None:
    n = 60
    seen = []
    states = []
    for rank in range(saved_world):
        sampler = ResumableSampler(n, seed=3, rank=rank, world_size=saved_world)
        it = iter(sampler)
        seen += [next(it) for _ in range(consumed)]
        states.append(sampler.state_dict())
    for rank in range(world):
        resumed = ResumableSampler(n, seed=0, rank=rank, world_size=world)
        resumed.load_state_dict(resumed.reshard_state_dict(states) if saved_world != world else states[rank])
        seen += list(resumed)
    assert sorted(seen) == list(range(n))  # 60 divides evenly here: no padding


def test_re_split_twice_and_padding_like_distributed_sampler() -> None:
    first = [ResumableSampler(10, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [next(iter(s)) for s in first]  # one each
    second = [ResumableSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in second:
        s.load_state_dict(first[0].state_dict())
    iters = [iter(s) for s in second]
    seen += [next(i) for i in iters]  # one each: 5 consumed
    third = [ResumableSampler(10, seed=1, rank=r, world_size=4) for r in range(4)]
    for s in third:
        s.load_state_dict(second[0].state_dict())
    rest = [list(s) for s in third]
    assert [len(r) for r in rest] == [2, 2, 2, 2]  # 5 left, padded to 8 as DistributedSampler pads
    assert sorted(set(seen + sum(rest, []))) == list(range(10)) and len(seen) == 5


def test_ranks_at_different_positions_cannot_be_re_split() -> None:
    samplers = [ResumableSampler(20, seed=1, rank=r, world_size=2) for r in range(2)]
    next(iter(samplers[0]))
    with pytest.raises(StateMismatchError, match="different data positions"):
        samplers[0].reshard_state_dict([s.state_dict() for s in samplers])


@pytest.mark.parametrize("pairwise", [64, 0])  # the pairwise check, and the coverage mask for many pieces
def test_overlapping_or_missing_pieces_of_a_crafted_checkpoint_are_refused(tmp_path: Path, pairwise: int,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded tensor whose pieces overlap (leaving a gap elsewhere) must never load garbage."""
    from unbroken.distributed import load
    from unbroken.distributed.load import build_tensors, plan_load
    from unbroken.distributed.sources import DirectSource

    monkeypatch.setattr(load, "_MAX_PAIRWISE", pairwise)

    model = torch.nn.Linear(2, 4, bias=False)
    storage = LocalStorage(tmp_path / "run")
    unbroken.save(tmp_path / "run" / "step_000000001", {"model": model}, step=1, rng=False)
    manifest = Manifest.from_json((tmp_path / "run/step_000000001/manifest.json").read_bytes(), "t")
    pieces = (ShardEntry("model/weight", (0, 0), (4, 2)), ShardEntry("model/weight", (2, 0), (4, 2)))
    manifest.sharded["model/weight#s"] = ShardedTensor("F32", (8, 2), pieces)  # rows 2-3 twice, 6-7 never
    manifest.state["model"]["value"]["weight"] = {"__tensor__": "model/weight#s"}
    plan = plan_load(manifest, {"model": torch.nn.Linear(2, 8, bias=False)}, 0, 1, strict=True)
    data = DirectSource().fetch(storage, "step_000000001", manifest, plan.needs)
    with pytest.raises(CorruptCheckpointError, match="overlap or leave part"):
        build_tensors(plan, manifest, data)


def test_assembling_a_sharded_tensor_allocates_nothing_before_its_pieces_are_checked(tmp_path: Path) -> None:
    """The loader's own check (behind the manifest's): 65 pieces, more than are compared pair by pair,
    declaring a [2**20, 2**20] tensor must be refused, not counted with a mask of that shape."""
    from unbroken.distributed.load import build_tensors, plan_load
    from unbroken.distributed.sources import DirectSource

    unbroken.save(tmp_path / "run" / "step_000000001", {"model": torch.nn.Linear(2, 4, bias=False)}, step=1,
                  rng=False)
    manifest = Manifest.from_json((tmp_path / "run/step_000000001/manifest.json").read_bytes(), "t")
    pieces = tuple(ShardEntry("model/weight", (4 * i, 0), (4, 2)) for i in range(65))
    manifest.sharded["model/weight#s"] = ShardedTensor("F32", (2**20, 2**20), pieces)
    manifest.state["model"]["value"]["weight"] = {"__tensor__": "model/weight#s"}
    plan = plan_load(manifest, {"model": torch.nn.Linear(2**20, 2**20, bias=False, device="meta")}, 0, 1,
                     strict=True)
    data = DirectSource().fetch(LocalStorage(tmp_path / "run"), "step_000000001", manifest, plan.needs)
    with pytest.raises(CorruptCheckpointError, match="hold 520 elements, not the 1099511627776"):
        build_tensors(plan, manifest, data)


def test_ranks_whose_models_differ_are_not_committed() -> None:
    from unbroken.checkpoint.single import build_manifest
    from unbroken.distributed.assemble import assemble, failure_report
    from unbroken.distributed.rankplan import plan_rank
    from unbroken.errors import StorageError
    from unbroken.state import capture

    plans = [plan_rank(capture({"model": torch.nn.Linear(3, n)}, rng=False), rank, 2) for rank, n in enumerate((4, 5))]
    base = build_manifest(capture({"model": torch.nn.Linear(3, 4)}, rng=False), 1, None, None)
    reports = [{"ok": True, "rank": p.rank, "digest": p.digest(), "layout": p.layout} for p in plans]
    with pytest.raises(StorageError, match=r"rank 1's model/optimizer state does not match rank 0's .*model/weight"):
        assemble(base, plans[0], reports)
    with pytest.raises(StorageError, match="rank 1 failed to write its file: OSError"):
        assemble(base, plans[0], [reports[0], failure_report(1, OSError(5, "Input/output error"))])
