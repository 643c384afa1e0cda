"""manifest.json: written strict, read as hostile input, versioned."""

from __future__ import annotations

import json
import math
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import unbroken
from tests.fuzzing import fuzz, mutate
from tests.helpers import make_mlp, reseal, sealed_manifest
from unbroken.errors import CorruptCheckpointError, UnsupportedFormatError
from unbroken.format import FORMAT_VERSION, MANIFEST_NAME, FileEntry, Manifest, TensorEntry, check_file_name
from unbroken.format.manifest import MAX_MANIFEST_CONTAINERS

WHERE = "run/step_000000001/manifest.json"


def _manifest(**changes: Any) -> Manifest:
    base = dict(
        step=12, created=1700000000.25, world_size=1, versions={"unbroken": "0.1.0", "torch": "2.4"},
        files={"rank00000.safetensors": FileEntry(size=128, header_crc32c=0xDEADBEEF)},
        tensors={"model/w": TensorEntry("rank00000.safetensors", "F32", (2, 3), 96, 120, 123),
                 "model/b": TensorEntry("rank00000.safetensors", "BF16", (4,), 120, 128, 2**32 - 1)},
        state={"model": {"kind": "module", "value": {"w": {"__tensor__": "model/w"}}}},
        metrics={"loss": 0.25, "acc": {"__float__": "nan"}}, metadata={"args": {"lr": 0.1}},
    )
    base.update(changes)
    return Manifest(**base)


def _doc(**changes: Any) -> dict[str, Any]:
    doc = json.loads(_manifest().to_json())
    doc.update(changes)
    return doc


def _parse(doc: Any) -> Manifest:
    raw = doc if isinstance(doc, bytes) else sealed_manifest(doc) if isinstance(doc, dict) else json.dumps(doc).encode()
    return Manifest.from_json(raw, WHERE)


def _corrupt(doc: Any, match: str | None = None) -> str:
    with pytest.raises(CorruptCheckpointError) as info:
        _parse(doc)
    message = str(info.value)
    assert WHERE in message
    if match:
        assert match in message
    return message


# ---------------------------------------------------------------------------------------------
# round-trip
# ---------------------------------------------------------------------------------------------

def test_to_json_from_json_roundtrips() -> None:
    manifest = _manifest()
    again = Manifest.from_json(manifest.to_json(), WHERE)
    assert again == manifest
    assert again.total_bytes == 128


def test_to_json_is_strict_utf8_json() -> None:
    raw = _manifest(metadata={"name": "ünï ✓"}).to_json()
    doc = json.loads(raw.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"constant {c}"))
    assert doc["format"] == "unbroken-checkpoint"
    assert doc["format_version"] == FORMAT_VERSION


def test_to_json_refuses_non_finite_floats() -> None:
    with pytest.raises(ValueError):
        _manifest(created=math.nan).to_json()


def test_manifest_of_a_real_checkpoint_parses(ckpt_path: Path) -> None:
    unbroken.save(ckpt_path, {"model": make_mlp(0)}, step=5, metrics={"loss": 1.5})
    manifest = Manifest.from_json((ckpt_path / MANIFEST_NAME).read_bytes(), WHERE)
    assert manifest.step == 5
    assert manifest.world_size == 1
    assert set(manifest.files) == {"rank00000.safetensors"}
    assert manifest.total_bytes == (ckpt_path / "rank00000.safetensors").stat().st_size
    assert "model/0.weight" in manifest.tensors
    assert manifest.tensors["model/0.weight"].shape == (8, 4)
    assert manifest.versions["torch"] == torch.__version__
    assert Manifest.from_json(manifest.to_json(), WHERE) == manifest


def test_minor_version_bump_is_accepted() -> None:
    major = FORMAT_VERSION.split(".")[0]
    assert _parse(_doc(format_version=f"{major}.99")).format_version == f"{major}.99"


# ---------------------------------------------------------------------------------------------
# refused documents
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"   \n\t ", b"\n"], ids=["empty", "spaces", "newline"])
def test_empty_manifest_says_empty(raw: bytes) -> None:
    _corrupt(raw, "empty")


@pytest.mark.parametrize("raw", [b"{", b"{\"format\": }", b"\xff\xfe{}", b"null null", b"[1,]"],
                         ids=["open", "missing-value", "not-utf8", "two-values", "trailing-comma"])
def test_invalid_json_is_refused(raw: bytes) -> None:
    _corrupt(raw, "not valid JSON")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_constants_are_refused(constant: str) -> None:
    raw = reseal(_manifest().to_json().replace(b'"loss":0.25', b'"loss":' + constant.encode()))
    assert constant.encode() in raw
    _corrupt(raw, constant)


@pytest.mark.parametrize("doc", [[], "x", 1, None], ids=["list", "string", "int", "null"])
def test_not_an_object_is_refused(doc: Any) -> None:
    _corrupt(doc, "not an unbroken manifest")


@pytest.mark.parametrize("fmt", [None, "safetensors", "unbroken-checkpoint2", 1])
def test_wrong_format_is_refused(fmt: Any) -> None:
    doc = _doc(format=fmt)
    if fmt is None:
        del doc["format"]
    _corrupt(doc, "not an unbroken manifest")


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.1", "999999.0"])
def test_other_major_version_is_unsupported(version: str) -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        _parse(_doc(format_version=version))
    assert version in str(info.value) and "upgrade" in str(info.value)
    assert isinstance(info.value, CorruptCheckpointError)  # a bad checkpoint to callers that skip those


@pytest.mark.parametrize("version", [None, 1, 1.0, "", "x.0", "-1.0", " 1.0", [1, 0], "2", "1.0.0", "1.",
                                     "\u0661.0"])
def test_invalid_version_is_corrupt_not_unsupported(version: Any) -> None:
    with pytest.raises(CorruptCheckpointError) as info:
        _parse(_doc(format_version=version))
    assert not isinstance(info.value, UnsupportedFormatError)


def test_unknown_checksum_algorithm_is_refused() -> None:
    _corrupt(_doc(checksum="md5"), "checksum")


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", "a\x00b", ".", "..", "", "x" * 256,
                                  "manifest.json", "a b", "ü.safetensors"])
def test_file_names_that_are_paths_are_refused(name: str) -> None:
    doc = _doc()
    doc["files"] = {name: {"size": 1, "header_crc32c": 0}}
    for entry in doc["tensors"].values():
        entry["file"] = name
    _corrupt(doc, "not an allowed file name")
    with pytest.raises(CorruptCheckpointError):
        check_file_name(name, WHERE)


@pytest.mark.parametrize("name", ["rank00000.safetensors", "a-b_c.d", "...", "x" * 255])
def test_plain_file_names_are_allowed(name: str) -> None:
    assert check_file_name(name, WHERE) == name


def test_tensor_in_an_unlisted_file_is_refused() -> None:
    doc = _doc()
    doc["tensors"]["model/w"]["file"] = "rank00001.safetensors"
    _corrupt(doc, "unlisted file")


@pytest.mark.parametrize("field, value, match", [
    ("size", -1, "size"), ("size", 1.5, "size"), ("size", True, "size"), ("size", "1", "size"),
    ("header_crc32c", -5, "header_crc32c"), ("header_crc32c", None, "header_crc32c"),
])
def test_bad_file_entry_is_refused(field: str, value: Any, match: str) -> None:
    doc = _doc()
    doc["files"]["rank00000.safetensors"][field] = value
    _corrupt(doc, match)


@pytest.mark.parametrize("field, value, match", [
    ("dtype", "F128", "unknown dtype"), ("dtype", None, "unknown dtype"),
    ("shape", [-1, 3], "shape"), ("shape", [2, True], "shape"), ("shape", "2,3", "malformed"),
    ("offsets", [-8, 16], "offsets"), ("offsets", [0], "malformed"), ("offsets", [0, 1.5], "offsets"),
    ("offsets", None, "malformed"), ("crc32c", -1, "crc32c"), ("crc32c", "0", "crc32c"),
])
def test_bad_tensor_entry_is_refused(field: str, value: Any, match: str) -> None:
    doc = _doc()
    doc["tensors"]["model/w"][field] = value
    _corrupt(doc, match)


def test_tensor_entry_not_an_object_is_refused() -> None:
    doc = _doc()
    doc["tensors"]["model/w"] = [1, 2]
    _corrupt(doc, "not an object")


@pytest.mark.parametrize("field, value", [
    ("step", -1), ("step", True), ("step", 1.0), ("step", None), ("world_size", -2), ("world_size", "1"),
    ("created", "yesterday"), ("created", None), ("created", True),
    ("files", []), ("tensors", None), ("versions", "x"), ("state", []), ("metrics", [1]),
])
def test_bad_top_level_fields_are_refused(field: str, value: Any) -> None:
    _corrupt(_doc(**{field: value}))


@pytest.mark.parametrize("field", ["step", "world_size", "created", "files", "tensors", "versions", "state"])
def test_missing_required_fields_are_refused(field: str) -> None:
    doc = _doc()
    del doc[field]
    _corrupt(doc)


def test_non_finite_created_is_refused() -> None:
    raw = reseal(_manifest().to_json().replace(b'"created":1700000000.25', b'"created":1e400'))
    _corrupt(raw, "created")


def test_oversized_manifest_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    import unbroken.format.manifest as manifest_module
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    _corrupt(_manifest().to_json(), "cap")


def test_deeply_nested_manifest_is_refused() -> None:
    raw = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _corrupt(raw)


def test_a_manifest_of_millions_of_empty_arrays_is_refused_before_they_are_built() -> None:
    """Parsing is bounded by structure, not only by bytes: 40 MB of "[]," would build 13M lists (1 GB)."""
    raw = b"[" + b"[]," * (40_000_000 // 3) + b"[]]"
    tracemalloc.start()
    try:
        message = _corrupt(raw, f"over the cap of {MAX_MANIFEST_CONTAINERS} (MAX_MANIFEST_CONTAINERS")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(raw), f"refusing it allocated {peak} bytes"
    assert "13333335 JSON arrays and objects" in message


def test_brackets_inside_strings_are_not_counted_as_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    import unbroken.format.manifest as manifest_module
    plain = _manifest(metadata=None).to_json()
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_CONTAINERS", plain.count(b"[") + plain.count(b"{") + 10)
    assert _parse(_doc(metadata='[{"[\\' * 100)).metadata == '[{"[\\' * 100
    _corrupt(_doc(metadata=[[]] * 20), "MAX_MANIFEST_CONTAINERS")


def test_a_trailing_newline_is_no_part_of_a_version_or_a_file_name() -> None:
    _corrupt(_doc(format_version="1.2\n"), "format_version")
    with pytest.raises(CorruptCheckpointError, match="not an allowed file name"):
        check_file_name("rank00000.safetensors\n", WHERE)


@pytest.mark.parametrize("field, value", [("file", ["rank00000.safetensors"]), ("dtype", {"F32": 1})])
def test_unhashable_tensor_fields_are_refused(field: str, value: Any) -> None:
    doc = _doc()
    doc["tensors"]["model/w"][field] = value
    _corrupt(doc)


@pytest.mark.parametrize("version", ["\u00b2.0", "9" * 5000 + ".0"], ids=["superscript", "5000-digits"])
def test_odd_digit_versions_are_corrupt(version: str) -> None:
    _corrupt(_doc(format_version=version))


def test_huge_integer_created_is_refused() -> None:
    _corrupt(_doc(created=10**400), "created")


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------

def _parse_or_corrupt(raw: bytes) -> None:
    try:
        manifest = Manifest.from_json(raw, WHERE)
    except CorruptCheckpointError:
        return
    for entry in manifest.tensors.values():  # whatever is accepted is self-consistent
        assert entry.file in manifest.files
        assert all(isinstance(d, int) and d >= 0 for d in entry.shape)
        assert entry.begin >= 0 and entry.end >= 0


_VALID = _manifest().to_json()


@fuzz
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _parse_or_corrupt(raw)


@fuzz
@given(st.data())
def test_fuzz_byte_mutations_of_a_valid_manifest(data: Any) -> None:
    _parse_or_corrupt(mutate(data, _VALID, truncate=True))


_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
            | st.sampled_from(["F32", "rank00000.safetensors", "1.0", "2.0", "unbroken-checkpoint", "crc32c"]))
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=6)


def _mutated_doc(draw: Any, values: Any) -> bytes:
    doc = json.loads(_VALID)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["top", "file", "tensor", "shape", "offsets"]))
        if target == "top":
            doc[draw(st.sampled_from(sorted(doc) + ["extra"]))] = draw(values)
        elif target == "file" and isinstance(doc.get("files"), dict) and doc["files"]:
            entry = doc["files"][draw(st.sampled_from(sorted(doc["files"])))]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["size", "header_crc32c"]))] = draw(values)
        elif isinstance(doc.get("tensors"), dict) and doc["tensors"]:
            entry = doc["tensors"][draw(st.sampled_from(sorted(doc["tensors"])))]
            if not isinstance(entry, dict):
                continue
            if target == "tensor":
                entry[draw(st.sampled_from(["file", "dtype", "shape", "offsets", "crc32c"]))] = draw(values)
            elif isinstance(entry.get(target), list) and entry[target]:
                entry[target][draw(st.integers(0, len(entry[target]) - 1))] = draw(values)
    return sealed_manifest(doc)


@st.composite
def _scalar_mutations(draw: Any) -> bytes:
    return _mutated_doc(draw, _scalars)


@st.composite
def _any_mutations(draw: Any) -> bytes:
    return _mutated_doc(draw, _json)


@fuzz
@given(_scalar_mutations())
def test_fuzz_mutated_fields_scalar_values(raw: bytes) -> None:
    _parse_or_corrupt(raw)


@fuzz
@given(_any_mutations())
def test_fuzz_mutated_fields_any_json_values(raw: bytes) -> None:
    _parse_or_corrupt(raw)


# ---------------------------------------------------------------------------------------------
# the manifest's own checksum
# ---------------------------------------------------------------------------------------------

def test_the_manifest_ends_with_its_own_checksum() -> None:
    raw = _manifest().to_json()
    assert raw.endswith(b"}") and b',"manifest_crc32c":' in raw[-40:]
    assert json.loads(raw)["manifest_crc32c"] > 0  # still plain JSON for any tool


@pytest.mark.parametrize("seed", range(8))
def test_a_flipped_bit_anywhere_in_the_manifest_is_caught(seed: int) -> None:
    # A flip in a state value (epoch 5 -> 4) would still parse as valid JSON: only the checksum sees it.
    import random

    raw = bytearray(_manifest().to_json())
    rng = random.Random(seed)
    offset = rng.randrange(len(raw))
    raw[offset] ^= 1 << rng.randrange(8)
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(bytes(raw), WHERE)


def test_an_edited_state_value_names_the_checksum_mismatch() -> None:
    raw = _manifest().to_json()
    edited = raw.replace(b'"loss":0.25', b'"loss":0.24')
    assert edited != raw
    _corrupt(edited, "manifest checksum mismatch")


def test_a_removed_checksum_is_refused_for_sealed_versions() -> None:
    raw = _manifest().to_json()
    stripped = re.sub(rb',"manifest_crc32c":[0-9]+\}$', b"}", raw)
    _corrupt(stripped, "checksum (manifest_crc32c, last member) is missing")


def test_format_1_0_manifests_without_a_checksum_still_load() -> None:
    doc = json.loads(_manifest().to_json())
    doc["format_version"] = "1.0"
    del doc["manifest_crc32c"]
    assert _parse(json.dumps(doc).encode()).format_version == "1.0"
