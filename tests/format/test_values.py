"""The typed codec: values ⇄ strict JSON plus a list of tensors, exact type for type, no code."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import assert_exactly_equal
from unbroken.errors import CorruptCheckpointError, UnserializableStateError
from unbroken.format.values import MAX_DEPTH, decode, encode


class TensorStore:
    """The dict-backed add_tensor/get_tensor pair a checkpoint provides."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, where: str, tensor: torch.Tensor) -> str:
        name = f"t{len(self.tensors)}:{where}"
        self.tensors[name] = tensor.clone()  # what reaches the file is a copy of the bytes
        return name

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def roundtrip(value: Any, where: str = "root") -> tuple[Any, str]:
    """Encode, go through strict JSON text (as the manifest does), decode.  (decoded, json text)."""
    store = TensorStore()
    text = json.dumps(encode(value, where, store.add), allow_nan=False)
    return decode(json.loads(text), store.get), text


def assert_roundtrips(value: Any) -> Any:
    out, _ = roundtrip(value)
    assert_exactly_equal(out, value)
    return out


# ---------------------------------------------------------------------------------------------
# exact round-trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 7, 2**63 - 1, 2**64, -(2**100), 2**200 + 1,
    "", "text", "ünïcødé ✓ \x00 \n", "__tensor__",
    0.1 + 0.2, 1e-308, 5e-324, -5e-324, 1.7976931348623157e308, 1 / 3, -0.0, 0.0,
    math.inf, -math.inf,
], ids=repr)
def test_scalars_roundtrip_exactly(value: Any) -> None:
    assert_roundtrips(value)


def test_nan_roundtrips_as_float_nan() -> None:
    out, _ = roundtrip(math.nan)
    assert type(out) is float and math.isnan(out)


def test_negative_zero_keeps_its_sign() -> None:
    out, _ = roundtrip(-0.0)
    assert math.copysign(1.0, out) == -1.0


def test_bool_is_not_turned_into_int() -> None:
    out, _ = roundtrip([True, 1, False, 0])
    assert [type(v) for v in out] == [bool, int, bool, int]


def test_int_dict_keys_stay_ints() -> None:
    value = {0: "a", 1: {"x": 1}, -5: None, 10**30: 1.5}
    out = assert_roundtrips(value)
    assert all(type(k) is int for k in out)


def test_mixed_and_odd_dict_keys() -> None:
    value = {1: "int", "1": "str", False: "bool", None: "none", 2.5: "float", (1, "a"): "tuple",
             math.inf: "inf", -0.5: "negative"}
    assert_roundtrips(value)


def test_dict_order_is_preserved() -> None:
    value = {"b": 1, "a": 2, "c": 3}
    out = assert_roundtrips(value)
    assert list(out) == ["b", "a", "c"]
    out2 = assert_roundtrips({3: 1, 1: 2, 2: 3})
    assert list(out2) == [3, 1, 2]


def test_nested_tuples_and_lists() -> None:
    value = {"betas": (0.9, 0.999), "nested": ((1, (2, (3,))), [(), [()], ([],)]), "empty": ()}
    assert_roundtrips(value)


def test_tuple_and_list_are_distinguished() -> None:
    out, _ = roundtrip([(1, 2), [1, 2]])
    assert type(out[0]) is tuple and type(out[1]) is list


@pytest.mark.parametrize("value", [
    {"lr": math.inf, "wd": -math.inf, "m": math.nan, "none": None, "flag": True},
    [math.nan, [math.inf, (-math.inf,)]],
], ids=["dict", "nested"])
def test_non_finite_floats_anywhere(value: Any) -> None:
    _, text = roundtrip(value)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert_roundtrips(value)


def test_output_is_strict_json() -> None:
    store = TensorStore()
    node = encode({"a": [math.nan, math.inf, -math.inf], 1: (np.float32(np.nan),)}, "w", store.add)
    json.dumps(node, allow_nan=False)  # must not raise


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64,
                                   np.float16, np.float32, np.float64, np.bool_])
def test_numpy_arrays_roundtrip(dtype: Any) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.random((3, 4)) * 100).astype(dtype)
    out = assert_roundtrips(arr)
    assert out.flags.writeable


def test_numpy_zero_dim_array_keeps_its_shape() -> None:
    assert_roundtrips(np.array(3.5))


def test_numpy_arrays_empty_and_non_contiguous() -> None:
    assert_roundtrips(np.zeros((0, 3), dtype=np.int32))
    base = np.arange(24, dtype=np.int64).reshape(4, 6)
    assert_roundtrips(base.T)
    assert_roundtrips(base[::2, 1::3])


def test_numpy_global_rng_state_roundtrips_and_is_usable() -> None:
    np.random.seed(1234)
    np.random.rand(3)
    state = np.random.get_state()
    out = assert_roundtrips(state)
    assert out[1].dtype == np.uint32
    expected = np.random.rand(5)
    np.random.set_state(out)
    assert np.array_equal(np.random.rand(5), expected)


@pytest.mark.parametrize("value", [np.float32(0.1), np.float64(0.1), np.float16(1.5), np.int64(-(2**62)),
                                   np.int8(-7), np.uint64(2**64 - 1), np.uint32(7), np.bool_(True),
                                   np.bool_(False), np.float32(np.inf), np.float32(-np.inf)], ids=repr)
def test_numpy_scalars_keep_their_type(value: Any) -> None:
    assert_roundtrips(value)


def test_numpy_nan_scalar() -> None:
    out, _ = roundtrip(np.float32(np.nan))
    assert type(out) is np.float32 and np.isnan(out)


def test_namespace_roundtrips() -> None:
    ns = argparse.Namespace(lr=0.1, betas=(0.9, 0.99), layers=[1, 2], name="x", flag=None,
                            sub=argparse.Namespace(a=1))
    out = assert_roundtrips(ns)
    assert isinstance(out, argparse.Namespace) and isinstance(out.sub, argparse.Namespace)


def test_namespace_with_tag_like_attribute_names() -> None:
    assert_roundtrips(argparse.Namespace(**{"__tensor__": 1, "__dict__x": 2}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64,
                                   torch.float8_e4m3fn, torch.uint8])
def test_torch_dtype_roundtrips(dtype: torch.dtype) -> None:
    out = assert_roundtrips({"dtype": dtype})
    assert out["dtype"] is dtype


def test_torch_size_roundtrips() -> None:
    out = assert_roundtrips(torch.Size([2, 0, 3]))
    assert isinstance(out, torch.Size)
    assert_roundtrips(torch.Size([]))


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**5000, -(10**5000), 2**64 - 1],
                         ids=["2**63", "-2**63-1", "10**5000", "-10**5000", "2**64-1"])
def test_ints_beyond_json_safe_range_roundtrip(value: int) -> None:
    out, text = roundtrip({"n": value, "l": [value, (value,)]})
    assert_exactly_equal(out, {"n": value, "l": [value, (value,)]})
    json.loads(text)  # any JSON parser (digit limits included) reads it


@pytest.mark.parametrize("value", [2**64, -(2**70)], ids=["2**64", "-2**70"])
def test_big_int_dict_keys_roundtrip(value: int) -> None:
    assert_roundtrips({value: 1, 1: value})


def test_huge_int_dict_key_roundtrips() -> None:
    assert_roundtrips({10**5000: 1})


def test_bytes_roundtrip() -> None:
    assert_roundtrips(b"")
    assert_roundtrips(bytes(range(256)))


def test_tensors_go_to_the_store_not_the_json() -> None:
    store = TensorStore()
    t = torch.arange(1000, dtype=torch.float64)
    node = encode({"w": t}, "model", store.add)
    assert len(store.tensors) == 1
    text = json.dumps(node)
    assert "999" not in text
    out = decode(json.loads(text), store.get)
    assert_exactly_equal(out, {"w": t})


def test_tensor_paths_name_where_they_are() -> None:
    seen: list[str] = []

    def add(where: str, tensor: torch.Tensor) -> str:
        seen.append(where)
        return where

    encode({"state": {0: {"exp_avg": torch.zeros(1)}}, "groups": [torch.ones(1)]}, "optimizer", add)
    assert seen == ["optimizer/state/0/exp_avg", "optimizer/groups/0"]


@pytest.mark.parametrize("key", ["__tensor__", "__dict__", "__float__", "__tuple__", "__ndarray__",
                                 "__npscalar__", "__namespace__", "__bytes__", "__unknown__"])
def test_user_keys_that_look_like_tags_are_not_confused(key: str) -> None:
    assert_roundtrips({key: "x"})
    assert_roundtrips({key: ["x", 1]})
    assert_roundtrips({key: {"__float__": "nan"}})
    assert_roundtrips([{key: 5}, {key: 1, "other": 2}])


def test_user_dict_that_looks_like_a_tagged_value_is_not_decoded_as_it() -> None:
    # {"__float__": "inf"} as *data* must come back as that dict, not as float('inf')
    out = assert_roundtrips({"__float__": "inf"})
    assert out == {"__float__": "inf"}
    out = assert_roundtrips({"__tensor__": "x"})
    assert out == {"__tensor__": "x"}


class Key(str):
    pass


def test_str_subclass_keys_roundtrip_as_equal_strings() -> None:
    value = {Key("alpha"): 1, Key("__tensor__"): 2}
    out, _ = roundtrip(value)
    assert out == {"alpha": 1, "__tensor__": 2}
    assert list(out) == ["alpha", "__tensor__"]
    assert all(type(k) is str for k in out)  # decoding never builds user classes


def test_deep_but_allowed_nesting() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH - 2):
        value = [value]
    assert_roundtrips(value)


# ---------------------------------------------------------------------------------------------
# encode errors
# ---------------------------------------------------------------------------------------------

def _encode_error(value: Any, where: str = "root") -> str:
    with pytest.raises(UnserializableStateError) as info:
        encode(value, where, TensorStore().add)
    message = str(info.value)
    assert "Fix" in message
    return message


def test_lambda_in_scheduler_state_names_its_path() -> None:
    message = _encode_error({"lr_lambdas": [lambda epoch: 1.0], "last_epoch": 3}, "scheduler")
    assert "scheduler/lr_lambdas/0" in message


@pytest.mark.parametrize("value, kind", [
    (object(), "object"), ({1, 2}, "set"), (frozenset(), "frozenset"), (1 + 2j, "complex"),
    (namedtuple("P", "x y")(1, 2), "P"), (print, "builtin_function_or_method"),
])
def test_unsupported_values_are_refused_with_path_and_fix(value: Any, kind: str) -> None:
    message = _encode_error({"cfg": {"inner": [0, value]}}, "user")
    assert "user/cfg/inner/1" in message
    assert f".{kind} is neither" in message


def test_object_dtype_array_is_refused() -> None:
    message = _encode_error({"a": np.array([object()], dtype=object)}, "bag")
    assert "bag/a" in message


def test_unsupported_dict_key_is_refused() -> None:
    _encode_error({frozenset({1}): 1})


def test_tensor_as_dict_key_is_refused() -> None:
    with pytest.raises(UnserializableStateError):
        encode({torch.zeros(1): 1}, "root", TensorStore().add)


def test_reference_cycle_is_refused_not_a_recursion_error() -> None:
    cyc: list[Any] = []
    cyc.append(cyc)
    with pytest.raises(UnserializableStateError):
        encode(cyc, "root", TensorStore().add)


@pytest.mark.parametrize("arr", [np.array([1, 2], dtype=">i4"), np.array([1.5], dtype=np.longdouble)],
                         ids=["big-endian", "longdouble"])
def test_arrays_torch_cannot_hold_are_refused_cleanly(arr: np.ndarray) -> None:
    try:
        assert_roundtrips(arr)
    except UnserializableStateError as exc:
        assert "root" in str(exc) and "Fix" in str(exc)


def test_numpy_bytes_scalar_either_roundtrips_or_is_refused_at_encode() -> None:
    try:
        out, _ = roundtrip(np.bytes_(b"ab"))
    except UnserializableStateError:
        return
    assert out == b"ab"


# ---------------------------------------------------------------------------------------------
# decode of crafted input: only CorruptCheckpointError, never code
# ---------------------------------------------------------------------------------------------

def _no_tensors(name: str) -> torch.Tensor:
    raise CorruptCheckpointError(f"no tensor {name!r}")


@pytest.mark.parametrize("node", [
    {"__evil__": "os.system"},
    {"__import__": "os"},
    {"__reduce__": ["os.system", ["echo"]]},
    {"__float__": "NaNx"},
    {"__float__": 1.0},
    {"__tuple__": "ab"},
    {"__tuple__": {"a": 1}},
    {"__dict__": "x"},
    {"__dict__": [1, 2]},
    {"__dict__": [[1]]},
    {"__dict__": [[1, 2, 3]]},
    {"__dict__": [[[1], 2]]},
    {"__dict__": [[{"a": 1}, 2]]},
    {"__namespace__": [1, 2]},
    {"__namespace__": "x"},
    {"__npscalar__": ["O", 1]},
    {"__npscalar__": ["|O", None]},
    {"__npscalar__": ["<U3", "abc"]},
    {"__npscalar__": ["V8", 1]},
    {"__npscalar__": ["not-a-dtype", 1]},
    {"__npscalar__": ["<i8"]},
    {"__npscalar__": "<i8"},
    {"__dtype__": "float128"},
    {"__dtype__": "__class__"},
    {"__dtype__": 5},
    {"__size__": [1, "2"]},
    {"__size__": [True]},
    {"__size__": 3},
    {"__bytes__": 3},
    {"__tensor__": 3},
    {"__tensor__": ["a"]},
    {"__ndarray__": None},
    {"__int__": 5},
    {"__int__": "zz"},
    {"__int__": ""},
    {"__int__": "f" * (2**20 + 1)},
])
def test_crafted_nodes_raise_corrupt_checkpoint_error(node: Any) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode(node, _no_tensors)
    with pytest.raises(CorruptCheckpointError):
        decode({"outer": [node]}, _no_tensors)


def test_unknown_tag_message_names_it() -> None:
    with pytest.raises(CorruptCheckpointError, match="__future__"):
        decode({"__future__": 1}, _no_tensors)


@pytest.mark.parametrize("make", [
    lambda v: [v], lambda v: {"k": v}, lambda v: {"__tuple__": [v]}, lambda v: {"__dict__": [[1, v]]},
], ids=["list", "dict", "tuple", "tagged-dict"])
def test_too_deep_nesting_is_refused(make: Any) -> None:
    node: Any = 0
    for _ in range(MAX_DEPTH + 5):
        node = make(node)
    with pytest.raises(CorruptCheckpointError, match="deeper"):
        decode(node, _no_tensors)


def test_very_deep_nesting_does_not_hit_recursion_limit() -> None:
    node: Any = 0
    for _ in range(sys.getrecursionlimit() * 2):
        node = [node]
    with pytest.raises(CorruptCheckpointError):
        decode(node, _no_tensors)


def test_non_json_python_objects_in_tree_are_refused() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode({"a": (1, 2)}, _no_tensors)  # a tuple can never come out of json.loads
    with pytest.raises(CorruptCheckpointError):
        decode({"a": object()}, _no_tensors)


def test_decode_never_executes_code(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        {"__reduce__": ["builtins.open", [str(marker), "w"]]},
        {"__npscalar__": [f"open('{marker}', 'w')", 1]},
        {"__dtype__": f"open('{marker}','w')"},
        {"__namespace__": {"__dict__": [["__class__", "os.system"]]}},
    ]
    for node in payloads:
        try:
            decode(node, _no_tensors)
        except Exception:  # the exception type is tested elsewhere; here: nothing ran
            pass
    assert not marker.exists()
    assert not os.path.exists("pwned")


# Crafted values inside otherwise well-formed tags are corrupt too, never another exception type.
@pytest.mark.parametrize("node", [
    {"__npscalar__": ["<i8", "abc"]},            # ValueError from np.int64('abc')
    {"__npscalar__": ["<i1", 1000]},             # OverflowError from np.int8(1000)
    {"__npscalar__": ["<f4", {"a": 1}]},         # TypeError from np.float32(dict)
    {"__npscalar__": [{"__dict__": []}, 1]},     # ValueError from np.dtype(dict)
    {"__namespace__": {"__dict__": [[1, 2]]}},   # TypeError: keywords must be strings
    {"__namespace__": {"__dict__": [["__class__", "x"]]}},  # TypeError: __class__ must be set to a class
    {"__bytes__": "abc"},                        # binascii.Error: incorrect padding
], ids=["npscalar-str-int", "npscalar-overflow", "npscalar-dict-value", "npscalar-dict-dtype",
        "namespace-int-keys", "namespace-class-attr", "bytes-bad-base64"])
def test_crafted_tag_arguments_raise_corrupt_checkpoint_error(node: Any) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode(node, _no_tensors)


def test_npscalar_with_list_value_is_refused() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode({"__npscalar__": ["<i8", [1, 2]]}, _no_tensors)


def test_ndarray_tag_on_a_bfloat16_tensor_raises_corrupt_checkpoint_error() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode({"__ndarray__": "t"}, lambda name: torch.zeros(2, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# property: random JSON-ish trees round-trip exactly
# ---------------------------------------------------------------------------------------------

_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8))
_keys = st.integers() | st.text(max_size=8) | st.sampled_from(["__tensor__", "__dict__", "__float__", "__x__"])
_trees = st.recursive(
    _leaves,
    lambda children: (st.lists(children, max_size=4)
                      | st.lists(children, max_size=4).map(tuple)
                      | st.dictionaries(_keys, children, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_property_random_trees_roundtrip_exactly(value: Any) -> None:
    out, text = roundtrip(value)
    assert_exactly_equal(out, value)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_a_key_that_is_a_tag_followed_by_a_newline_is_a_plain_key() -> None:
    """Tags are matched whole: "__tuple__\n" is an ordinary dict key, both ways."""
    assert decode({"__tuple__\n": [1, 2]}, _no_tensors) == {"__tuple__\n": [1, 2]}
    assert encode({"__tuple__\n": 1}, "x", _no_tensors) == {"__tuple__\n": 1}
