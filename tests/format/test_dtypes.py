"""Every dtype of the safetensors format that torch has is stored bit for bit, under the name the
safetensors package gives it; every kind of tensor that has no plain bytes is refused with advice
that works."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import unbroken
from tests.helpers import SyncManager
from unbroken.errors import UnserializableStateError
from unbroken.format.dtypes import DTYPE_TO_NAME, ITEMSIZES, check_storable

STORED = sorted(DTYPE_TO_NAME.items(), key=lambda pair: pair[1])


def random_bits(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    """Arbitrary bytes viewed as ``dtype``: NaN payloads and signalling NaNs included (a bool is a byte 0 or 1)."""
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (*shape[:-1], shape[-1] * dtype.itemsize),
                        dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    return raw.view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                                                     b.contiguous().reshape(-1).view(torch.uint8))


def header_dtypes(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return {k: v["dtype"] for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}


@pytest.mark.parametrize("dtype, name", STORED, ids=[name for _, name in STORED])
def test_each_safetensors_dtype_roundtrips_bit_exact(tmp_path: Path, dtype: torch.dtype, name: str) -> None:
    tensors = {"whole": random_bits(dtype), "scalar": random_bits(dtype, (1,))[0],
               "empty": torch.empty(0, 3, dtype=dtype)}
    unbroken.save(tmp_path / "ck", {"t": tensors}, rng=False)
    live: dict[str, Any] = {"t": {}}
    unbroken.load(tmp_path / "ck", live, rng=False)
    for key, tensor in tensors.items():
        assert same_bits(live["t"][key], tensor), key
    # A plain safetensors reader sees the same dtype name and bytes.
    (file,) = (tmp_path / "ck").glob("*.safetensors")
    assert set(header_dtypes(file).values()) == {name}
    with safe_open(str(file), framework="pt") as f:
        assert same_bits(f.get_tensor("t/whole"), tensors["whole"])


def test_complex64_in_a_managed_run_roundtrips_bit_exact(tmp_path: Path) -> None:
    """complex64, conjugate views included (stored resolved), through the manager's save path."""
    z = random_bits(torch.complex64, (4, 3))
    state: dict[str, Any] = {"z": {"plain": z, "conj": z.conj(), "e8m0": random_bits(torch.float8_e8m0fnu)},
                             "m": nn.Linear(2, 2)}
    with SyncManager(tmp_path, state, every_steps=1, save_on_close=False) as ckpt:
        ckpt.step(1)
    live: dict[str, Any] = {"z": {}, "m": nn.Linear(2, 2)}
    with SyncManager(tmp_path, live, save_on_close=False) as ckpt:
        assert ckpt.restore() == 1
    assert same_bits(live["z"]["plain"], z)
    assert same_bits(live["z"]["conj"], z.conj().resolve_conj())
    assert same_bits(live["z"]["e8m0"], state["z"]["e8m0"])


def test_the_names_are_the_ones_safetensors_writes(tmp_path: Path) -> None:
    for dtype, name in STORED:
        safetensors.torch.save_file({"t": random_bits(dtype)}, str(tmp_path / "x.safetensors"))
        assert header_dtypes(tmp_path / "x.safetensors") == {"t": name}
        assert ITEMSIZES[name] == dtype.itemsize


def test_every_dtype_safetensors_writes_is_stored(tmp_path: Path) -> None:
    """Completeness: a torch dtype the safetensors package can write is one unbroken stores, except
    float4_e2m1fn_x2 (safetensors' F4 counts 4-bit values, torch counts bytes of two)."""
    writable = []
    for dtype in {v for v in vars(torch).values() if isinstance(v, torch.dtype)}:
        try:
            tensor = torch.zeros(2 * dtype.itemsize, dtype=torch.uint8).view(dtype)
            safetensors.torch.save_file({"t": tensor}, str(tmp_path / "x.safetensors"))
        except Exception:  # noqa: BLE001 - any refusal (of torch or safetensors) means it cannot be written
            continue
        writable.append(dtype)
    assert torch.complex64 in writable
    assert {d for d in writable if d != torch.float4_e2m1fn_x2} <= set(DTYPE_TO_NAME)


# -- the advice for what cannot be stored -----------------------------------------------------------

def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8)


def _nested() -> torch.Tensor:
    return torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)


UNSTORABLE: list[tuple[str, Callable[[], torch.Tensor], list[str]]] = [
    ("qint8", _quantized, ["quantized", "t.int_repr()", "t.q_scale()", "t.q_zero_point()", "t.dequantize()"]),
    ("quint8", lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.quint8), ["quantized", "int_repr"]),
    ("qint32", lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint32), ["quantized", "int_repr"]),
    ("quint4x2", lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint4x2), ["quantized", "int_repr"]),
    ("per-channel", lambda: torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2]),
                                                       torch.tensor([0, 1]), 0, torch.qint8),
     ["quantized", "q_per_channel_scales()", "q_per_channel_axis()"]),
    ("nested-jagged", _nested, ["nested", "list(t.unbind())", "to_padded_tensor"]),
    ("nested-strided", lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]), ["nested", "unbind"]),
    ("sparse-coo", lambda: torch.randn(3, 3).to_sparse(), ["sparse", "t.to_dense()", "indices()"]),
    ("sparse-csr", lambda: torch.randn(3, 3).to_sparse_csr(), ["sparse", "t.to_dense()", "crow_indices()"]),
    ("meta", lambda: torch.empty(3, device="meta"), ["meta tensor", "no data", "to_empty"]),
    ("complex128", lambda: torch.randn(3, dtype=torch.complex128), ["no complex128", "view_as_real", "float64"]),
    ("complex32", lambda: torch.randn(3, dtype=torch.complex64).to(torch.complex32),
     ["no complex32", "view_as_real", "float16"]),
    ("float4", lambda: torch.zeros(3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
     ["F4", "t.view(torch.uint8)", ".view(torch.float4_e2m1fn_x2)"]),
    ("bits8", lambda: torch.zeros(3, dtype=torch.uint8).view(torch.bits8), ["t.view(torch.uint8)", "bits8"]),
]


@pytest.mark.parametrize("make, advice", [(m, a) for _, m, a in UNSTORABLE], ids=[i for i, _, _ in UNSTORABLE])
def test_each_unstorable_kind_is_refused_with_advice_that_fits_it(tmp_path: Path, make: Callable[[], torch.Tensor],
                                                                   advice: list[str]) -> None:
    with pytest.raises(UnserializableStateError) as info:
        unbroken.save(tmp_path / "ck", {"model": {"w": make()}})
    message = str(info.value)
    assert message.startswith("model/w: ")
    assert "Fix: " in message
    for words in advice:
        assert words in message, words
    assert "complex64" not in message.replace("torch.complex64", "")  # no advice meant for another dtype
    assert not (tmp_path / "ck").exists()


def test_the_advice_for_a_quantized_tensor_keeps_every_bit() -> None:
    q = _quantized()
    rebuilt = torch._make_per_tensor_quantized_tensor(q.int_repr(), q.q_scale(), q.q_zero_point())
    assert torch.equal(rebuilt.int_repr(), q.int_repr()) and rebuilt.q_scale() == q.q_scale()
    with pytest.raises(UnserializableStateError, match="quantized"):
        check_storable(q, "q")


def test_the_advice_for_a_nested_tensor_keeps_every_value(tmp_path: Path) -> None:
    nested = _nested()
    parts = list(nested.unbind())
    unbroken.save(tmp_path / "ck", {"parts": parts}, rng=False)
    live: dict[str, Any] = {"parts": []}
    unbroken.load(tmp_path / "ck", live, rng=False)
    rebuilt = torch.nested.nested_tensor(live["parts"], layout=torch.jagged)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.unbind(), nested.unbind(), strict=True))
