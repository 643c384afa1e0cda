"""The fast save paths (layouts and views cached across saves, copies straight into the staging buffer,
the collector paused, staging buffers prepared ahead) write exactly the bytes of the safetensors layout.

The expected file is built here independently of the writer: header JSON from ``json.dumps`` of the
planned entries, tensor bytes from numpy, in the documented order (state entry by first appearance,
then element size, largest first).
"""

from __future__ import annotations

import gc
import json
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from unbroken._internal.gcpause import paused_gc
from unbroken.format import Manifest
from unbroken.io import host_buffers
from unbroken.io.host_buffers import BufferedSave, HostBuffers
from unbroken.io.plan import SMALL_TENSOR, LayoutCache, live_runs
from unbroken.io.writer import write_checkpoint
from unbroken.manager.save_runner import SaveRunner
from unbroken.state import Snapshot
from unbroken.storage import open_storage

FILE = "rank00000.safetensors"
DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}


def value_bytes(tensor: torch.Tensor) -> bytes:
    plain = tensor.detach().resolve_conj().resolve_neg().contiguous()
    array = (plain.view(torch.int16) if plain.dtype == torch.bfloat16 else plain).numpy()  # numpy has no bf16
    return array.reshape(-1).view(np.uint8).tobytes()


def expected_file(tensors: dict[str, torch.Tensor]) -> bytes:
    first_seen: dict[str, int] = {}
    for name in tensors:
        first_seen.setdefault(name.split("/")[0], len(first_seen))
    order = sorted(tensors, key=lambda n: (first_seen[n.split("/")[0]], -tensors[n].element_size()))
    table: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data, at = [], 0
    for name in order:
        raw = value_bytes(tensors[name])
        table[name] = {"dtype": DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                       "data_offsets": [at, at + len(raw)]}
        data.append(raw)
        at += len(raw)
    body = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + b"".join(data)


class Tricky:
    """Tensors that exercise every branch: 0-d, bool bytes other than 0/1, NaN payloads, a group
    ending on an odd byte (the next group starts unaligned), a negative-bit view, a transposed
    (non-contiguous) tensor, one over the batching size, and many small ones."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.z = torch.randn(6, dtype=torch.complex64)
        self.odd = torch.tensor([7, 8, 9], dtype=torch.uint8)
        self.flags = torch.tensor([0, 1, 2, 255], dtype=torch.uint8).view(torch.bool)
        self.nan = torch.tensor([0x7FC00001, 0x7F800001, 0xFFC12345, 0x80000000], dtype=torch.int64
                                ).to(torch.int32).view(torch.float32)
        self.half = torch.tensor([0x7FC1, 0xFF81 - 0x10000], dtype=torch.int16).view(torch.bfloat16)
        self.square = torch.randn(8, 8)
        self.big = torch.randn(SMALL_TENSOR // 4 + 1000)
        self.small = [torch.randn(3, 5) for _ in range(300)]
        self.steps = [torch.tensor(float(i)) for i in range(50)]
        self.imag = self.z.imag  # a real view into the complex tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"a/odd": self.odd, "b/flags": self.flags, "b/nan": self.nan, "b/half": self.half,
               "b/square": self.square, "b/imag": self.imag, "c/big": self.big}
        out.update({f"d/s{i}": t for i, t in enumerate(self.small)})
        out.update({f"d/step{i}": t for i, t in enumerate(self.steps)})
        out["a/int"] = torch.arange(5)
        return out

    def change(self, round_: int) -> None:
        """Between saves: values in place, a tensor replaced, one transposed at the same address, and
        a view swapped for its negative-bit twin at the same address."""
        for t in self.small[::7]:
            t.add_(1.0)
        for t in self.steps:
            t += 1
        self.small[3] = torch.randn(3, 5)
        self.square = self.square.t() if round_ % 2 else self.square.t().contiguous()
        self.imag = self.z.conj().imag if round_ % 2 else self.z.imag
        self.big[::1000] = float(round_)


def saved(tmp_path: Path, name: str) -> bytes:
    return (tmp_path / name / FILE).read_bytes()


def manifest_for(step: int) -> Manifest:
    return Manifest(step=step, created=0.0, world_size=1, versions={}, files={}, tensors={}, state={})


@pytest.mark.parametrize("budget", [None, 1 << 20, 40_001], ids=["one-buffer", "chunked", "tiny-chunks"])
def test_every_save_writes_the_exact_layout_through_cached_plans_and_views(tmp_path: Path, budget: int | None) -> None:
    """Synchronous and staged saves, repeated over a changing state, each equal the layout built
    independently from the state of that moment."""
    storage = open_storage(str(tmp_path), None, create=True)
    state = Tricky()
    cache, host = LayoutCache(), HostBuffers(budget)
    for round_ in range(4):
        tensors = state.tensors()
        expected = expected_file(tensors)
        layout = cache.layout_for(tensors)
        write_checkpoint(storage, f"sync{round_}", layout.plan, live_runs(layout.plan, tensors, layout),
                         manifest_for(round_))
        staged = BufferedSave(host, layout, tensors)
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(write_checkpoint, storage, f"staged{round_}", staged.plan, staged.runs(),
                               manifest_for(round_))
            staged.fill(done)
        assert done.result().step == round_
        assert saved(tmp_path, f"sync{round_}") == expected
        assert saved(tmp_path, f"staged{round_}") == expected
        state.change(round_)


def test_layout_is_reused_while_names_dtypes_and_shapes_are_unchanged() -> None:
    state = Tricky()
    cache = LayoutCache()
    first = cache.layout_for(state.tensors())
    state.change(0)
    assert cache.layout_for(state.tensors()) is first
    state.small[0] = torch.randn(5, 3)  # same bytes, another shape: another header
    assert cache.layout_for(state.tensors()) is not first


def many_tensors_state(count: int) -> dict[str, torch.Tensor]:
    return {f"m/t{i}": torch.full((4,), float(i)) for i in range(count)}


def collections_during(action: Callable[[], object]) -> int:
    seen: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(count)
    try:
        action()
    finally:
        gc.callbacks.remove(count)
    return len(seen)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_save_never_runs_the_cyclic_collector_on_the_training_thread(tmp_path: Path, background: bool) -> None:
    """Thousands of tensors allocate thousands of small objects; a collection would walk the whole
    training process's heap.  The collector stays paused over the whole hand-over (for a synchronous
    save, the whole save)."""
    assert gc.isenabled()
    storage = open_storage(str(tmp_path), None, create=True)
    runner = SaveRunner(storage, background, "wait", None, on_commit=lambda _m: None)
    try:
        for step in (1, 2):  # the first save builds the layout, the second reuses it
            snap, manifest, name = Snapshot(tensors=many_tensors_state(5000)), manifest_for(step), f"step_{step}"
            # at most the one collection the pause deferred, as it ends (before: one per ~700 objects)
            assert collections_during(lambda: runner.save(name, step, snap, manifest)) <= 1  # noqa: B023
            runner.wait()
    finally:
        runner.close()
    assert gc.isenabled()
    assert saved(tmp_path, "step_2") == expected_file(many_tensors_state(5000))


def test_pauses_overlapping_on_two_threads_keep_the_collector_off_until_the_last_ends() -> None:
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with paused_gc():
            entered.set()
            release.wait()

    with paused_gc():
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait()
    assert not gc.isenabled()  # the other thread's pause is still active
    release.set()
    thread.join()
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled_after_a_pause() -> None:
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.fixture
def counted_allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[int], threading.Event]]:
    sizes: list[int] = []
    go = threading.Event()
    real = host_buffers._allocate

    def allocate(size: int, pinned: bool) -> torch.Tensor:
        go.wait()
        sizes.append(size)
        return real(size, pinned)

    monkeypatch.setattr(host_buffers, "_allocate", allocate)
    yield sizes, go
    go.set()


def test_prepared_buffers_are_allocated_in_the_background_and_reused_by_the_first_save(
        counted_allocations: tuple[list[int], threading.Event]) -> None:
    sizes, go = counted_allocations
    host = HostBuffers()
    thread = host.prepare(10_000)
    assert thread is not None and thread.is_alive()  # the caller did not wait for the allocation
    got: list[list[torch.Tensor]] = []
    save = threading.Thread(target=lambda: got.append(host.buffers_for(10_500, pinned=False)))
    save.start()  # a save arriving first waits for the preparation instead of allocating its own
    go.set()
    save.join()
    assert len(sizes) == 1 and sizes[0] >= 10_500
    assert got[0][0].numel() == sizes[0]
    assert host.prepare(10_000) is None  # the buffers in hand already fit


def test_prepared_buffers_stay_within_the_staging_budget(
        counted_allocations: tuple[list[int], threading.Event]) -> None:
    sizes, go = counted_allocations
    go.set()
    whole = HostBuffers(budget_bytes=1 << 20)
    thread = whole.prepare(1 << 20)  # fits the budget exactly: no headroom over it
    assert thread is not None
    thread.join()
    halves = HostBuffers(budget_bytes=1 << 20)
    thread = halves.prepare(3 << 20)
    assert thread is not None
    thread.join()
    assert sizes == [1 << 20, 1 << 19, 1 << 19]
    assert whole.allocated_bytes == halves.allocated_bytes == 1 << 20


def test_save_runner_prepares_only_for_background_saves_between_saves(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path), None, create=True)
    sync = SaveRunner(storage, False, "wait", None, on_commit=lambda _m: None)
    sync.prepare(1 << 20)  # nothing to prepare: synchronous saves stream from tensor memory
    sync.close()
    background = SaveRunner(storage, True, "wait", None, on_commit=lambda _m: None)
    try:
        background.prepare(1 << 20)
        tensors = many_tensors_state(100)
        background.save("step_1", 1, Snapshot(tensors=tensors), manifest_for(1))
        background.prepare(64 << 20)  # a save is in flight: its buffers are not touched
        background.wait()
    finally:
        background.close()
    assert saved(tmp_path, "step_1") == expected_file(tensors)


def test_fast_tensor_entries_and_table_equal_the_dataclass_and_json_dumps() -> None:
    from unbroken.format import FileEntry, TensorEntry, TensorSpan
    from unbroken.format.manifest import tensor_entries

    spans = [TensorSpan("m/w", "F32", (2, 3), 80, 104), TensorSpan('m/"é\\n', "BF16", (), 104, 106)]
    entries = tensor_entries(FILE, spans, [7, 2**32 - 1])
    assert entries == {"m/w": TensorEntry(FILE, "F32", (2, 3), 80, 104, 7),
                       'm/"é\\n': TensorEntry(FILE, "BF16", (), 104, 106, 2**32 - 1)}
    manifest = manifest_for(3)
    manifest.files, manifest.tensors = {FILE: FileEntry(106, 1)}, entries
    text = manifest.to_json().decode()
    table = {n: {"file": t.file, "dtype": t.dtype, "shape": list(t.shape), "offsets": [t.begin, t.end],
                 "crc32c": t.crc32c} for n, t in entries.items()}
    assert '"tensors":' + json.dumps(table, ensure_ascii=False, separators=(",", ":")) in text
    assert Manifest.from_json(text.encode(), "test").tensors == entries
