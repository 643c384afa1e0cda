"""The safetensors layout: our files open with the reference reader, and hostile headers are refused."""

from __future__ import annotations

import json
import math
import os
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import unbroken
from tests.fuzzing import fuzz, mutate
from tests.helpers import assert_exactly_equal, sealed_manifest
from unbroken.errors import CorruptCheckpointError
from unbroken.format import MAX_HEADER_BYTES, NAME_TO_DTYPE, PREFIX_BYTES, build_header, header_length, parse_header
from unbroken.io.checksum import crc32c

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402

TENSOR_FILE = "rank00000.safetensors"


class Holder:
    """A user object holding named tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(state)


# ---------------------------------------------------------------------------------------------
# build_header / parse_header
# ---------------------------------------------------------------------------------------------

def _layout(entries: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[Any], int]:
    header, spans = build_header(entries)
    size = spans[-1].end if spans else len(header)
    return header, spans, size


@pytest.mark.parametrize("entries", [
    [],
    [("a", "F32", (2, 3))],
    [("a", "F32", (2, 3)), ("b", "I64", ()), ("c", "BOOL", (0, 5)), ("d", "BF16", (7,))],
    [("ünï/cødé ✓", "U8", (3,)), ("x" * 300, "F64", (1, 1, 1))],
    [(f"t{i}", dtype, (i % 3, 2)) for i, dtype in enumerate(sorted(NAME_TO_DTYPE))],
], ids=["empty", "one", "mixed", "unicode-names", "every-dtype"])
def test_build_then_parse_roundtrips(entries: list[tuple[str, str, tuple[int, ...]]]) -> None:
    header, spans, size = _layout(entries)
    (length,) = struct.unpack("<Q", header[:PREFIX_BYTES])
    assert length == len(header) - PREFIX_BYTES
    assert header_length(header[:PREFIX_BYTES], size, "f") == length
    parsed = parse_header(header[PREFIX_BYTES:], size, "f")
    assert sorted(parsed, key=lambda s: s.begin) == spans
    assert [(s.name, s.dtype, s.shape) for s in spans] == entries
    for span in spans:
        assert span.nbytes == math.prod(span.shape) * NAME_TO_DTYPE[span.dtype].itemsize


def test_layout_is_back_to_back_and_data_is_8_byte_aligned() -> None:
    header, spans, size = _layout([("a", "U8", (3,)), ("b", "F64", (2,)), ("c", "I16", (5,))])
    assert len(header) % 8 == 0
    assert spans[0].begin == len(header)
    for prev, nxt in zip(spans, spans[1:]):
        assert nxt.begin == prev.end
    assert size == len(header) + 3 + 16 + 10


def test_header_is_plain_json_with_pt_metadata() -> None:
    header, _, _ = _layout([("w", "F32", (2,))])
    table = json.loads(header[PREFIX_BYTES:].decode())
    assert table["__metadata__"] == {"format": "pt"}
    assert table["w"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# ---------------------------------------------------------------------------------------------
# the reference reader opens our files, bit for bit
# ---------------------------------------------------------------------------------------------

EXPECTED_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                   torch.bfloat16, torch.float32, torch.float64, torch.uint16, torch.uint32, torch.uint64,
                   torch.float8_e4m3fn, torch.float8_e5m2]


def test_every_expected_dtype_is_supported() -> None:
    supported = set(NAME_TO_DTYPE.values())
    missing = [d for d in EXPECTED_DTYPES if d not in supported]
    assert not missing


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random *bits* (NaN payloads, subnormals, ...) for float types; 0/1 for bool."""
    numel = math.prod(shape)
    if dtype is torch.bool:
        return (torch.randint(0, 2, (numel,), generator=gen) == 1).reshape(shape)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _tensors_of_every_kind() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for dtype in NAME_TO_DTYPE.values():
        name = str(dtype).removeprefix("torch.")
        out[f"{name}_full"] = _random_tensor(dtype, (3, 5), gen)
        out[f"{name}_scalar"] = _random_tensor(dtype, (), gen)
        out[f"{name}_empty"] = _random_tensor(dtype, (0, 4), gen)
        base = _random_tensor(dtype, (4, 6), gen)
        out[f"{name}_transposed"] = base.t()
        out[f"{name}_strided"] = base[1::2, ::3]
    out["float32_expanded"] = torch.arange(4, dtype=torch.float32).reshape(1, 4).expand(3, 4)
    out["float32_offset_view"] = torch.arange(100, dtype=torch.float32)[37:45]
    out["int64_permuted_3d"] = torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1)
    assert not out["int8_transposed"].is_contiguous() and not out["float32_expanded"].is_contiguous()
    return out


def _bits(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return b"" if t.numel() == 0 else t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_our_files_open_with_safetensors_bit_for_bit(ckpt_path: Path) -> None:
    tensors = _tensors_of_every_kind()
    unbroken.save(ckpt_path, {"x": Holder(tensors)}, rng=False)
    with safe_open(str(ckpt_path / TENSOR_FILE), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == {f"x/{name}" for name in tensors}
        for name, expected in tensors.items():
            got = f.get_tensor(f"x/{name}")
            assert got.dtype == expected.dtype, name
            assert tuple(got.shape) == tuple(expected.shape), name
            assert _bits(got) == _bits(expected), name


def test_safetensors_load_file_agrees(ckpt_path: Path) -> None:
    from safetensors.torch import load_file
    tensors = {"w": torch.randn(3, 4), "i": torch.arange(5), "b": torch.tensor(True)}
    unbroken.save(ckpt_path, {"m": Holder(tensors)}, rng=False)
    loaded = load_file(str(ckpt_path / TENSOR_FILE))
    assert_exactly_equal({k.removeprefix("m/"): v for k, v in sorted(loaded.items())},
                         {k: v for k, v in sorted(tensors.items())})


def test_our_reader_returns_the_same_bits(ckpt_path: Path) -> None:
    tensors = _tensors_of_every_kind()
    unbroken.save(ckpt_path, {"x": Holder(tensors)}, rng=False)
    fresh = Holder({})
    unbroken.load(ckpt_path, {"x": fresh}, rng=False)
    assert set(fresh.tensors) == set(tensors)
    for name, expected in tensors.items():
        got = fresh.tensors[name]
        assert (got.dtype, tuple(got.shape)) == (expected.dtype, tuple(expected.shape)), name
        assert _bits(got) == _bits(expected), name


def test_safetensors_written_file_parses_with_our_validator(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    path = tmp_path / "ref.safetensors"
    save_file({"a": torch.randn(3, 2), "b": torch.zeros(0, dtype=torch.int64), "c": torch.tensor(1.5)}, str(path))
    raw = path.read_bytes()
    length = header_length(raw[:PREFIX_BYTES], len(raw), "ref")
    spans = {s.name: s for s in parse_header(raw[PREFIX_BYTES:PREFIX_BYTES + length], len(raw), "ref")}
    assert set(spans) == {"a", "b", "c"}
    assert spans["a"].shape == (3, 2) and spans["b"].nbytes == 0 and spans["c"].shape == ()


# ---------------------------------------------------------------------------------------------
# header_length
# ---------------------------------------------------------------------------------------------

def test_header_length_refuses_short_files() -> None:
    with pytest.raises(CorruptCheckpointError, match="too short"):
        header_length(b"\x00" * 4, 4, "f")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        header_length(b"", 0, "f")


def test_header_length_refuses_length_beyond_file() -> None:
    with pytest.raises(CorruptCheckpointError, match="header claims 100 bytes but the file holds 50"):
        header_length(struct.pack("<Q", 100), 50, "where.safetensors")


def test_header_length_refuses_length_over_cap_even_in_a_huge_file() -> None:
    with pytest.raises(CorruptCheckpointError, match="cap"):
        header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1), 10**12, "f")
    with pytest.raises(CorruptCheckpointError):
        header_length(b"\xff" * 8, 10**12, "f")
    assert header_length(struct.pack("<Q", MAX_HEADER_BYTES), 10**12, "f") == MAX_HEADER_BYTES


def test_header_length_message_names_the_file() -> None:
    with pytest.raises(CorruptCheckpointError, match="some/dir/rank00000.safetensors"):
        header_length(struct.pack("<Q", 10), 9, "some/dir/rank00000.safetensors")


# ---------------------------------------------------------------------------------------------
# hostile headers, parsed directly
# ---------------------------------------------------------------------------------------------

def _body(table: Any) -> bytes:
    return json.dumps(table).encode() if not isinstance(table, bytes) else table


def _entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


HOSTILE: list[tuple[str, Any, int | None, str]] = [
    # (id, table or raw body, data bytes after the header (None: exactly what the table needs), message)
    ("not-json", b"{not json", 0, "not valid UTF-8 JSON"),
    ("not-utf8", b'{"a": "\xff\xfe"}', 0, "not valid UTF-8 JSON"),
    ("array", [1, 2, 3], 0, "not a JSON object"),
    ("string", "hello", 0, "not a JSON object"),
    ("null", None, 0, "not a JSON object"),
    ("entry-not-object", {"a": [1, 2]}, 0, "is not an object"),
    ("unknown-dtype", {"a": _entry(dtype="F128")}, 8, "unknown dtype"),
    ("complex-dtype", {"a": _entry(dtype="C128")}, 8, "unknown dtype"),  # safetensors has C64, not C128
    ("missing-dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
    ("negative-dim", {"a": _entry(shape=(-2,))}, 8, "invalid shape"),
    ("bool-dim", {"a": _entry(shape=[True, 2])}, 8, "invalid shape"),
    ("float-dim", {"a": _entry(shape=[2.0])}, 8, "invalid shape"),
    ("string-dim", {"a": _entry(shape=["2"])}, 8, "invalid shape"),
    ("huge-dim", {"a": _entry(shape=(2**62,))}, 8, "invalid shape"),
    ("too-many-dims", {"a": _entry(shape=[1] * 65, offsets=(0, 4))}, 4, "invalid shape"),
    ("shape-not-list", {"a": _entry(shape=2)}, 8, "invalid shape"),
    ("offsets-missing", {"a": {"dtype": "F32", "shape": [2]}}, 8, "invalid data_offsets"),
    ("offsets-three", {"a": _entry(offsets=[0, 4, 8])}, 8, "invalid data_offsets"),
    ("offsets-negative", {"a": _entry(shape=(0,), offsets=(-4, -4))}, 0, "invalid data_offsets"),
    ("offsets-bool", {"a": _entry(shape=(1,), offsets=[False, 4])}, 4, "invalid data_offsets"),
    ("offsets-float", {"a": _entry(offsets=[0.0, 8.0])}, 8, "invalid data_offsets"),
    ("offsets-reversed", {"a": _entry(offsets=(8, 0))}, 8, "spans -8 bytes"),
    ("span-too-small", {"a": _entry(shape=(3,), offsets=(0, 8))}, 8, "spans 8 bytes but dtype F32"),
    ("span-too-big", {"a": _entry(shape=(1,), offsets=(0, 8))}, 8, "needs 4"),
    ("overflow-shape", {"a": _entry(shape=(2**40, 2**40), offsets=(0, 8))}, 8, "spans 8 bytes"),
    ("overflow-shape-64-dims", {"a": _entry(shape=[2**61] * 64, offsets=(0, 8))}, 8, "spans 8 bytes"),
    ("overlap", {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, 12, "overlaps"),
    ("duplicate-range", {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(0, 8))}, 8, "overlaps"),
    ("gap-first", {"a": _entry(offsets=(4, 12))}, 12, "gap"),
    ("gap-between", {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, 20, "gap"),
    ("out-of-file", {"a": _entry(offsets=(0, 8))}, 4, "truncated"),
    ("far-out-of-file", {"a": _entry(shape=(2**30,), offsets=(0, 2**32))}, 8, "truncated"),
    ("trailing-bytes", {"a": _entry(offsets=(0, 8))}, 9, "trailing bytes"),
    ("trailing-bytes-no-tensors", {"__metadata__": {}}, 1, "trailing bytes"),
]


@pytest.mark.parametrize("table, data, message", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_header_is_refused_precisely(table: Any, data: int, message: str) -> None:
    body = _body(table)
    file_size = PREFIX_BYTES + len(body) + data
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError) as info:
            parse_header(body, file_size, "dir/rank00000.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message in str(info.value)
    assert "dir/rank00000.safetensors" in str(info.value)
    assert peak < 1_000_000, f"parse allocated {peak} bytes"
    assert time.perf_counter() - start < 1.0


def test_valid_edge_cases_are_accepted() -> None:
    table = {"__metadata__": {"anything": "goes"},
             "z": _entry(shape=(0,), offsets=(0, 0)), "s": _entry(shape=(), offsets=(0, 4)),
             "e": _entry(dtype="BOOL", shape=(2, 0, 3), offsets=(4, 4))}
    body = _body(table)
    spans = parse_header(body, PREFIX_BYTES + len(body) + 4, "f")
    assert {s.name: s.nbytes for s in spans} == {"z": 0, "s": 4, "e": 0}


def test_metadata_key_is_not_a_tensor() -> None:
    body = _body({"__metadata__": {"format": "pt"}})
    assert parse_header(body, PREFIX_BYTES + len(body), "f") == []


@pytest.mark.parametrize("dtype", [[], {"F32": 1}], ids=["list", "dict"])
def test_unhashable_dtype_is_refused(dtype: Any) -> None:
    body = _body({"a": _entry(dtype=dtype)})
    with pytest.raises(CorruptCheckpointError):
        parse_header(body, PREFIX_BYTES + len(body) + 8, "f")


def test_giant_integer_literal_is_refused() -> None:
    body = b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'
    with pytest.raises(CorruptCheckpointError):
        parse_header(body, PREFIX_BYTES + len(body) + 8, "f")


def test_deeply_nested_json_is_refused() -> None:
    body = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(CorruptCheckpointError):
        parse_header(body, PREFIX_BYTES + len(body), "f")


# ---------------------------------------------------------------------------------------------
# hostile tensor files, end to end through unbroken.load (manifest made consistent with them)
# ---------------------------------------------------------------------------------------------

def _checkpoint_with_file(path: Path, content: bytes | None, size: int | None = None) -> Path:
    """A real checkpoint whose tensor file is replaced by ``content`` (or a sparse file of ``size``
    bytes starting with ``content``) and whose manifest is updated to match its size and header CRC,
    so that only the header's own validation stands between the file and the reader."""
    unbroken.save(path, {"x": Holder({"a": torch.zeros(2)})}, rng=False)
    file = path / TENSOR_FILE
    file.write_bytes(content or b"")
    if size is not None:
        os.truncate(file, size)
    manifest = json.loads((path / "manifest.json").read_bytes())
    entry = manifest["files"][TENSOR_FILE]
    entry["size"] = os.path.getsize(file)
    if content and len(content) >= PREFIX_BYTES:
        (length,) = struct.unpack("<Q", content[:PREFIX_BYTES])
        entry["header_crc32c"] = crc32c(content[:PREFIX_BYTES + length])
    (path / "manifest.json").write_bytes(sealed_manifest(manifest))
    return path


def _load_expecting_corrupt(path: Path) -> str:
    target = Holder({"a": torch.ones(2)})
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError) as info:
            unbroken.load(path, {"x": target}, rng=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 2_000_000, f"reading a hostile file allocated {peak} bytes"
    assert torch.equal(target.tensors["a"], torch.ones(2))
    assert TENSOR_FILE in str(info.value)
    return str(info.value)


def _file(table: Any, data: bytes) -> bytes:
    body = _body(table)
    return struct.pack("<Q", len(body)) + body + data


@pytest.mark.parametrize("content, message", [
    (_file({"x/a": _entry(shape=(2**40, 2**40), offsets=(0, 8))}, b"\0" * 8), "needs"),
    (_file({"x/a": _entry(dtype="F999")}, b"\0" * 8), "unknown dtype"),
    (_file({"x/a": _entry(offsets=(0, 8)), "x/b": _entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    (_file({"x/a": _entry(offsets=(0, 8))}, b"\0" * 12), "trailing bytes"),
    (_file({"x/a": _entry(shape=(2**31,), offsets=(0, 2**33))}, b"\0" * 8), "truncated"),
    (_file([1], b""), "not a JSON object"),
    (struct.pack("<Q", 2**63) + b"{}", "header claims"),
    (struct.pack("<Q", 10**6) + b"{}", "header claims"),
    (b"\x01\x02", "truncated"),
], ids=["overflow-shape", "unknown-dtype", "overlap", "trailing", "huge-span", "not-object",
        "huge-length", "length-past-end", "tiny-file"])
def test_hostile_tensor_file_through_the_reader(ckpt_path: Path, content: bytes, message: str) -> None:
    _checkpoint_with_file(ckpt_path, content)
    assert message in _load_expecting_corrupt(ckpt_path)


def test_header_over_cap_in_a_big_sparse_file_is_refused_without_reading_it(ckpt_path: Path) -> None:
    content = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    _checkpoint_with_file(ckpt_path, content, size=MAX_HEADER_BYTES + 4096)
    assert "cap" in _load_expecting_corrupt(ckpt_path)


# ---------------------------------------------------------------------------------------------
# fuzz: nothing but CorruptCheckpointError, and whatever parses is self-consistent
# ---------------------------------------------------------------------------------------------

def _check_spans_consistent(spans: list[Any], body: bytes, file_size: int) -> None:
    cursor = PREFIX_BYTES + len(body)
    for span in sorted(spans, key=lambda s: s.begin):
        assert span.begin == cursor
        assert span.nbytes == math.prod(span.shape) * NAME_TO_DTYPE[span.dtype].itemsize
        cursor = span.end
    assert cursor == file_size


def _parse_or_corrupt(body: bytes, file_size: int) -> None:
    try:
        spans = parse_header(body, file_size, "fuzz")
    except CorruptCheckpointError:
        return
    _check_spans_consistent(spans, body, file_size)


@fuzz
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2**64))
def test_fuzz_random_bytes(body: bytes, extra: int) -> None:
    _parse_or_corrupt(body, PREFIX_BYTES + len(body) + extra)
    try:
        header_length(body[:PREFIX_BYTES], extra, "fuzz")
    except CorruptCheckpointError:
        pass


_VALID_TABLE = {"__metadata__": {"format": "pt"}, "a": _entry("F32", (2, 3), (0, 24)),
                "b": _entry("I64", (), (24, 32)), "c": _entry("BOOL", (0,), (32, 32)),
                "d": _entry("U8", (5,), (32, 37))}
_VALID_DATA = 37

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
            | st.sampled_from(list(NAME_TO_DTYPE)))
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=8)


def _mutate(draw: Any, values: Any) -> tuple[dict[str, Any], int]:
    table = json.loads(json.dumps(_VALID_TABLE))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        name = draw(st.sampled_from(sorted(table)))
        action = draw(st.sampled_from(["field", "dim", "offset", "entry", "drop", "add"]))
        entry = table.get(name)
        if action == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(values)
        elif action == "dim" and isinstance(entry, dict) and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(values)
        elif action == "offset" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            offsets = entry["data_offsets"]
            if offsets:
                offsets[draw(st.integers(0, len(offsets) - 1))] = draw(values)
        elif action == "entry":
            table[name] = draw(values)
        elif action == "drop":
            table.pop(name, None)
        else:
            table[draw(st.text(max_size=4))] = draw(values)
    return table, _VALID_DATA + draw(st.integers(min_value=-40, max_value=40))


@st.composite
def _scalar_mutations(draw: Any) -> tuple[dict[str, Any], int]:
    return _mutate(draw, _scalars)


@st.composite
def _any_mutations(draw: Any) -> tuple[dict[str, Any], int]:
    return _mutate(draw, _json)


def test_fuzz_baseline_table_is_valid() -> None:
    body = _body(_VALID_TABLE)
    assert len(parse_header(body, PREFIX_BYTES + len(body) + _VALID_DATA, "f")) == 4


@fuzz
@given(_scalar_mutations())
def test_fuzz_mutated_header_scalar_values(case: tuple[dict[str, Any], int]) -> None:
    table, data = case
    body = _body(table)
    _parse_or_corrupt(body, max(PREFIX_BYTES + len(body) + data, 0))


@fuzz
@given(_any_mutations())
def test_fuzz_mutated_header_any_json_values(case: tuple[dict[str, Any], int]) -> None:
    table, data = case
    body = _body(table)
    _parse_or_corrupt(body, max(PREFIX_BYTES + len(body) + data, 0))


@fuzz
@given(st.data())
def test_fuzz_byte_mutations_of_a_valid_header(data: Any) -> None:
    body = mutate(data, _body(_VALID_TABLE))
    _parse_or_corrupt(body, PREFIX_BYTES + len(body) + _VALID_DATA)
