"""Reading a damaged or crafted checkpoint: a precise CorruptCheckpointError, live objects untouched."""

from __future__ import annotations

import builtins
import copy
import json
import os
import pickle
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import unbroken
from tests.helpers import assert_exactly_equal, make_training_state, sealed_manifest
from unbroken.errors import CorruptCheckpointError
from unbroken.format import MANIFEST_NAME, PREFIX_BYTES
from unbroken.io import read_manifest, read_tensors, verify_checkpoint
from unbroken.storage import LocalStorage

TENSOR_FILE = "rank00000.safetensors"


def _live_snapshot(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        out[key] = copy.deepcopy(value.state_dict() if callable(getattr(value, "state_dict", None)) else value)
    out["<rng>"] = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    return out


@pytest.fixture
def saved(ckpt_path: Path) -> Path:
    unbroken.save(ckpt_path, make_training_state(0, trained=True), step=3)
    return ckpt_path


@pytest.fixture
def live() -> Iterator[dict[str, Any]]:
    """Fresh objects to load into; after the test they must be exactly as they were."""
    state = make_training_state(1, trained=False)
    before = _live_snapshot(state)
    yield state
    assert_exactly_equal(_live_snapshot(state), before)


def _load_error(path: Path, live: dict[str, Any]) -> str:
    with pytest.raises(CorruptCheckpointError) as info:
        unbroken.load(path, live)
    return str(info.value)


def _layout(path: Path) -> tuple[int, int, dict[str, Any]]:
    """(data start, file size, manifest tensors) of the checkpoint's tensor file."""
    raw = (path / TENSOR_FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:PREFIX_BYTES])
    tensors = json.loads((path / MANIFEST_NAME).read_bytes())["tensors"]
    return PREFIX_BYTES + length, len(raw), tensors


def _flip_bit(file: Path, offset: int, bit: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))


def test_intact_checkpoint_loads(saved: Path) -> None:
    state = make_training_state(1, trained=False)
    record = unbroken.load(saved, state)
    assert record.step == 3
    assert_exactly_equal(state["model"].state_dict(), make_training_state(0, trained=True)["model"].state_dict())


# ---------------------------------------------------------------------------------------------
# bit flips
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_bit_flip_in_data_names_the_tensor_and_checksum(saved: Path, live: dict[str, Any], seed: int) -> None:
    start, size, tensors = _layout(saved)
    rng = random.Random(seed)
    offset = rng.randrange(start, size)
    _flip_bit(saved / TENSOR_FILE, offset, rng.randrange(8))
    hit = [name for name, t in tensors.items() if t["offsets"][0] <= offset < t["offsets"][1]]
    assert len(hit) == 1
    message = _load_error(saved, live)
    assert "checksum" in message
    assert repr(hit[0]) in message
    assert TENSOR_FILE in message


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_bit_flip_in_header_is_a_header_checksum_error(saved: Path, live: dict[str, Any], where: str) -> None:
    start, _, _ = _layout(saved)
    offset = {"first": PREFIX_BYTES, "middle": (PREFIX_BYTES + start) // 2, "last": start - 1}[where]
    _flip_bit(saved / TENSOR_FILE, offset, 3)
    message = _load_error(saved, live)
    assert "header checksum" in message
    assert TENSOR_FILE in message


@pytest.mark.parametrize("bit", [0, 7, 20, 63])
def test_bit_flip_in_length_prefix_is_refused(saved: Path, live: dict[str, Any], bit: int) -> None:
    _flip_bit(saved / TENSOR_FILE, bit // 8, bit % 8)
    assert TENSOR_FILE in _load_error(saved, live)


def test_tensor_file_from_another_checkpoint_with_the_same_layout(
        saved: Path, live: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other"
    with torch.random.fork_rng():  # building objects seeds torch; keep the live RNG as it was
        unbroken.save(other, make_training_state(2, trained=True), step=3)
    assert (other / TENSOR_FILE).stat().st_size == (saved / TENSOR_FILE).stat().st_size
    shutil.copyfile(other / TENSOR_FILE, saved / TENSOR_FILE)
    assert "checksum" in _load_error(saved, live)


# ---------------------------------------------------------------------------------------------
# truncated, missing, replaced files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["zero", "four", "header-1", "middle", "size-1"])
def test_truncated_tensor_file_names_the_file(saved: Path, live: dict[str, Any], cut: str) -> None:
    start, size, _ = _layout(saved)
    length = {"zero": 0, "four": 4, "header-1": start - 1, "middle": (start + size) // 2, "size-1": size - 1}[cut]
    os.truncate(saved / TENSOR_FILE, length)
    message = _load_error(saved, live)
    assert str(saved / TENSOR_FILE) in message
    assert "truncated" in message or "bytes" in message


def test_extended_tensor_file_is_refused(saved: Path, live: dict[str, Any]) -> None:
    with open(saved / TENSOR_FILE, "ab") as f:
        f.write(b"\0" * 16)
    assert TENSOR_FILE in _load_error(saved, live)


def test_deleted_tensor_file_is_missing(saved: Path, live: dict[str, Any]) -> None:
    (saved / TENSOR_FILE).unlink()
    message = _load_error(saved, live)
    assert "missing" in message and TENSOR_FILE in message


def test_symlinked_tensor_file_is_refused_not_followed(saved: Path, live: dict[str, Any], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(saved / TENSOR_FILE, elsewhere)  # identical bytes: following the link would "work"
    (saved / TENSOR_FILE).unlink()
    (saved / TENSOR_FILE).symlink_to(elsewhere)
    message = _load_error(saved, live)
    assert "symlink" in message and TENSOR_FILE in message


def test_symlinked_manifest_is_refused(saved: Path, live: dict[str, Any], tmp_path: Path) -> None:
    elsewhere = tmp_path / "manifest-copy.json"
    shutil.copyfile(saved / MANIFEST_NAME, elsewhere)
    (saved / MANIFEST_NAME).unlink()
    (saved / MANIFEST_NAME).symlink_to(elsewhere)
    assert "symlink" in _load_error(saved, live)


@pytest.mark.timeout(10)
def test_fifo_as_tensor_file_is_refused_without_hanging(saved: Path, live: dict[str, Any]) -> None:
    (saved / TENSOR_FILE).unlink()
    os.mkfifo(saved / TENSOR_FILE)
    message = _load_error(saved, live)
    assert "not a regular file" in message and TENSOR_FILE in message


@pytest.mark.timeout(10)
def test_fifo_as_manifest_is_refused_without_hanging(saved: Path, live: dict[str, Any]) -> None:
    (saved / MANIFEST_NAME).unlink()
    os.mkfifo(saved / MANIFEST_NAME)
    assert "not a regular file" in _load_error(saved, live)


def test_directory_as_tensor_file_is_refused(saved: Path, live: dict[str, Any]) -> None:
    (saved / TENSOR_FILE).unlink()
    (saved / TENSOR_FILE).mkdir()
    assert "not a regular file" in _load_error(saved, live)


class _Payload:
    """Unpickling this creates ``marker``: proof that something ran pickle.loads."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("padded", [False, True], ids=["raw", "padded-to-size"])
def test_pickle_payload_is_never_unpickled(saved: Path, live: dict[str, Any], tmp_path: Path, padded: bool) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": _Payload(marker)})
    if padded:  # same size as the real file, so only the content can give it away
        size = (saved / TENSOR_FILE).stat().st_size
        payload = payload + b"\0" * (size - len(payload))
    (saved / TENSOR_FILE).write_bytes(payload)
    _load_error(saved, live)
    assert not marker.exists()


def test_torch_save_file_in_place_of_tensor_file_is_refused(saved: Path, live: dict[str, Any]) -> None:
    torch.save({"model": live["model"].state_dict()}, saved / TENSOR_FILE)
    assert TENSOR_FILE in _load_error(saved, live)


# ---------------------------------------------------------------------------------------------
# manifest damage
# ---------------------------------------------------------------------------------------------

def test_empty_manifest_says_empty(saved: Path, live: dict[str, Any]) -> None:
    (saved / MANIFEST_NAME).write_bytes(b"")
    message = _load_error(saved, live)
    assert "empty" in message and MANIFEST_NAME in message


def test_truncated_manifest_is_refused(saved: Path, live: dict[str, Any]) -> None:
    raw = (saved / MANIFEST_NAME).read_bytes()
    (saved / MANIFEST_NAME).write_bytes(raw[: len(raw) // 2])
    assert MANIFEST_NAME in _load_error(saved, live)


def test_manifest_pointing_outside_the_checkpoint_is_refused(saved: Path, live: dict[str, Any]) -> None:
    doc = json.loads((saved / MANIFEST_NAME).read_bytes())
    doc["files"] = {"../" + TENSOR_FILE: doc["files"][TENSOR_FILE]}
    for entry in doc["tensors"].values():
        entry["file"] = "../" + TENSOR_FILE
    (saved / MANIFEST_NAME).write_bytes(sealed_manifest(doc))
    assert "not an allowed file name" in _load_error(saved, live)


def test_manifest_with_a_wrong_tensor_checksum(saved: Path, live: dict[str, Any]) -> None:
    doc = json.loads((saved / MANIFEST_NAME).read_bytes())
    name = next(n for n, t in doc["tensors"].items() if t["offsets"][1] > t["offsets"][0])
    doc["tensors"][name]["crc32c"] ^= 1
    (saved / MANIFEST_NAME).write_bytes(sealed_manifest(doc))
    message = _load_error(saved, live)
    assert "checksum" in message and repr(name) in message


def test_manifest_listing_a_tensor_the_file_lacks(saved: Path, live: dict[str, Any]) -> None:
    doc = json.loads((saved / MANIFEST_NAME).read_bytes())
    name, entry = next(iter(doc["tensors"].items()))
    doc["tensors"][name + "-ghost"] = dict(entry)
    (saved / MANIFEST_NAME).write_bytes(sealed_manifest(doc))
    assert "differ from the manifest" in _load_error(saved, live)


def test_manifest_disagreeing_with_header_shape(saved: Path, live: dict[str, Any]) -> None:
    doc = json.loads((saved / MANIFEST_NAME).read_bytes())
    name = next(n for n, t in doc["tensors"].items() if len(t["shape"]) == 2)
    doc["tensors"][name]["shape"] = list(reversed(doc["tensors"][name]["shape"])) + [1]
    (saved / MANIFEST_NAME).write_bytes(sealed_manifest(doc))
    assert repr(name) in _load_error(saved, live)


def test_state_referring_to_a_missing_tensor(saved: Path, live: dict[str, Any]) -> None:
    doc = json.loads((saved / MANIFEST_NAME).read_bytes())
    doc["state"]["model"]["value"]["0.weight"] = {"__tensor__": "no/such/tensor"}
    (saved / MANIFEST_NAME).write_bytes(sealed_manifest(doc))
    assert "no/such/tensor" in _load_error(saved, live)


# ---------------------------------------------------------------------------------------------
# the reader API
# ---------------------------------------------------------------------------------------------

def test_verify_and_read_tensors_on_an_intact_checkpoint(saved: Path) -> None:
    storage = LocalStorage(saved.parent, create=False)
    manifest = verify_checkpoint(storage, saved.name)
    assert manifest == read_manifest(storage, saved.name)
    tensors = read_tensors(storage, saved.name, manifest)
    assert set(tensors) == set(manifest.tensors)
    for name, tensor in tensors.items():
        entry = manifest.tensors[name]
        assert tuple(tensor.shape) == entry.shape and tensor.device.type == "cpu"


def test_verify_finds_a_flipped_bit(saved: Path) -> None:
    start, size, _ = _layout(saved)
    _flip_bit(saved / TENSOR_FILE, size - 1, 0)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify_checkpoint(LocalStorage(saved.parent, create=False), saved.name)


# ---------------------------------------------------------------------------------------------
# crafted state trees: refused as corrupt before anything is loaded
# ---------------------------------------------------------------------------------------------

def _craft_state(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((path / MANIFEST_NAME).read_bytes())
    edit(doc["state"])
    (path / MANIFEST_NAME).write_bytes(sealed_manifest(doc))


def _assert_refused_untouched(path: Path) -> None:
    state = make_training_state(1, trained=False)
    before = _live_snapshot(state)
    try:
        with pytest.raises(CorruptCheckpointError):
            unbroken.load(path, state)
    finally:
        assert_exactly_equal(_live_snapshot(state), before)


@pytest.mark.parametrize("edit", [
    lambda s: s.__setitem__("model", []),
    lambda s: s["model"].__setitem__("kind", "pickle"),
    lambda s: s["model"].__setitem__("kind", []),
    lambda s: s["model"].pop("value"),
    lambda s: s["model"].__setitem__("value", {"__evil__": 1}),
], ids=["entry-not-object", "unknown-kind", "kind-unhashable", "no-value", "unknown-tag"])
def test_crafted_state_entries_are_corrupt(saved: Path,
                                           edit: Callable[[dict[str, Any]], None]) -> None:
    _craft_state(saved, edit)
    _assert_refused_untouched(saved)


@pytest.mark.parametrize("edit", [
    lambda s: s["model"].__setitem__("value", [1, 2]),                       # AttributeError, before loading
    lambda s: s["model"]["value"].__setitem__("3.bias", 5),                  # RuntimeError, model half-loaded
    lambda s: s["model"].__setitem__("meta", [1]),                           # AttributeError
    lambda s: s["optimizer"]["value"].__setitem__("param_groups", [1]),      # AttributeError
    lambda s: s["optimizer"]["value"].__setitem__("state", [1]),             # AttributeError after the model
    lambda s: s["unbroken.rng"].__setitem__("value", {"python": "x"}),       # ValueError after everything
    lambda s: s["unbroken.rng"]["value"].__setitem__("numpy", [1]),          # ValueError after everything
], ids=["module-value-list", "module-non-tensor", "module-meta-list", "optimizer-groups-int",
        "optimizer-state-list", "rng-python-bad", "rng-numpy-bad"])
def test_crafted_state_values_are_corrupt_and_nothing_is_loaded(
        saved: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    _craft_state(saved, edit)
    _assert_refused_untouched(saved)


def _first_state(s: dict[str, Any]) -> dict[str, Any]:
    return s["optimizer"]["value"]["state"]["__dict__"][0][1]


@pytest.mark.parametrize("edit", [
    lambda s: s["model"]["meta"].__setitem__("1", 1.5),                             # AttributeError in BatchNorm
    lambda s: s["model"]["meta"].__setitem__("1", {"version": "x"}),                # TypeError in BatchNorm
    lambda s: s["optimizer"]["value"]["param_groups"][0]["params"].__setitem__(0, {"a": 1}),  # unhashable
    lambda s: _first_state(s).__setitem__("step", [1]),                             # TypeError in Adam
    lambda s: s["optimizer"]["value"]["state"]["__dict__"][0].__setitem__(1, 1.5),  # TypeError in Adam
], ids=["module-meta-not-dict", "module-meta-version-str", "optimizer-param-id-dict", "optimizer-step-list",
        "optimizer-param-state-float"])
def test_crafted_nested_state_values_are_corrupt_and_nothing_is_loaded(
        saved: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    _craft_state(saved, edit)
    _assert_refused_untouched(saved)
