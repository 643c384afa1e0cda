"""Exact, code-free encoding of state values as JSON plus a list of tensors.

``load_state_dict(saved)`` must receive values equal to what ``state_dict()`` returned, type for type.
Plain JSON loses tuples, int dict keys, ``inf``/``nan`` and NumPy types, so those are written as small
tagged objects (a dict with a single ``"__tag__"`` key).  Tensors and NumPy arrays are not stored in the
JSON at all: they are handed to ``add_tensor`` and replaced by a reference to the tensor file.

Decoding only ever builds the plain types listed here; it never imports or calls anything named by
the input, so a crafted manifest cannot execute code.

NumPy and torch are imported where a value needs them: decoding a manifest of plain values (what
``unbroken ls`` and ``show`` read) imports neither.
"""

from __future__ import annotations

import argparse
import base64
import math
import re
import sys
from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any, Union

from ..errors import CorruptCheckpointError, UnserializableStateError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Json", "encode", "decode", "MAX_DEPTH"]

Json = Union[None, bool, int, float, str, list["Json"], dict[str, "Json"]]  # noqa: UP007 (a runtime alias: Union keeps the string forward references)
AddTensor = Callable[[str, "torch.Tensor"], str]
GetTensor = Callable[[str], Any]  # a tensor, or a placeholder when only inspecting

MAX_DEPTH = 64
_INT64 = 2**63
_MAX_INT_HEX = 1 << 20  # a crafted "__int__" must not make decoding slow
_TAG = re.compile(r"^__[a-z]+__\Z")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def encode(value: Any, where: str, add_tensor: AddTensor, depth: int = 0) -> Json:
    """Encode ``value`` found at ``where`` (a readable path such as ``optimizer/state/0``)."""
    import numpy as np
    import torch

    if depth > MAX_DEPTH:
        raise UnserializableStateError(f"{where}: nested deeper than {MAX_DEPTH} levels (a reference cycle?)")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):  # before int/float: np.float64 subclasses float
        if value.dtype.kind not in "biuf":
            raise UnserializableStateError(
                f"state entry {where!r}: NumPy scalar of dtype {value.dtype} cannot be stored exactly. "
                "Fix: convert it to a Python value (.item()) or a number.")
        return {"__npscalar__": [value.dtype.str, encode(value.item(), where, add_tensor, depth + 1)]}
    if isinstance(value, int):
        value = int(value)
        return value if -_INT64 <= value < _INT64 else {"__int__": hex(value)}
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"__float__": _nonfinite_name(value)}
    if isinstance(value, torch.Tensor):
        return {"__tensor__": add_tensor(where, value)}
    if isinstance(value, np.ndarray):
        return _encode_ndarray(value, where, add_tensor)
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"__size__": [int(v) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, argparse.Namespace):
        return {"__namespace__": _encode_mapping(vars(value), where, add_tensor, depth)}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"__tuple__": [encode(v, f"{where}/{i}", add_tensor, depth + 1) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}/{i}", add_tensor, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return _encode_mapping(value, where, add_tensor, depth)
    raise UnserializableStateError(
        f"state entry {where!r}: a value of type {type(value).__module__}.{type(value).__qualname__} is "
        "neither a tensor nor a JSON-able value (None, bool, int, float, str, list, tuple, dict, NumPy array/scalar). "
        "Fix: convert it (e.g. a dataclass with dataclasses.asdict, a function to its name), or give the "
        "object state_dict()/load_state_dict() methods that return and accept such values."
    )


def _nonfinite_name(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def _encode_ndarray(value: np.ndarray, where: str, add_tensor: AddTensor) -> Json:
    import torch

    if value.dtype == object or value.dtype.kind not in "biuf":
        raise UnserializableStateError(
            f"state entry {where!r}: NumPy array of dtype {value.dtype} cannot be stored without pickle. "
            "Fix: use a numeric dtype."
        )
    # np.ascontiguousarray would turn a 0-d array into shape (1,); a 0-d array is always contiguous.
    array = value if value.flags["C_CONTIGUOUS"] else value.copy(order="C")
    try:
        tensor = torch.from_numpy(array)
    except (TypeError, ValueError) as exc:
        raise UnserializableStateError(
            f"state entry {where!r}: NumPy array of dtype {value.dtype} has no torch equivalent ({exc}). "
            "Fix: convert it, e.g. arr.astype(arr.dtype.newbyteorder('=')) or arr.astype(np.float64)."
        ) from None
    return {"__ndarray__": add_tensor(where, tensor)}


def _encode_mapping(value: Mapping[Any, Any], where: str, add_tensor: AddTensor, depth: int) -> Json:
    plain = all(isinstance(k, str) and not _TAG.match(k) for k in value)
    if plain:
        return {k: encode(v, f"{where}/{k}", add_tensor, depth + 1) for k, v in value.items()}
    items: list[Json] = []
    for k, v in value.items():
        text = _key_text(k)
        key = encode(k, f"{where} (key {text})", _no_tensor_keys, depth + 1)
        items.append([key, encode(v, f"{where}/{text}", add_tensor, depth + 1)])
    return {"__dict__": items}


def _key_text(key: Any) -> str:
    """A key for a path in messages and tensor names; str() of a >4300-digit int raises."""
    if isinstance(key, int) and key.bit_length() > 64:
        return f"<int of {key.bit_length()} bits>"
    return str(key)


def _no_tensor_keys(where: str, _tensor: torch.Tensor) -> str:
    raise UnserializableStateError(f"{where}: tensors cannot be dict keys. Fix: use an int or str key.")


def decode(node: Json, get_tensor: GetTensor, depth: int = 0) -> Any:
    """Rebuild the value :func:`encode` produced.  Raises :class:`CorruptCheckpointError` on bad input."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"state tree nested deeper than {MAX_DEPTH} levels")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode(v, get_tensor, depth + 1) for v in node]
    if not isinstance(node, dict):
        raise CorruptCheckpointError(f"unexpected JSON value of type {type(node).__name__} in state tree")
    if len(node) == 1:
        (key, arg), = node.items()
        if _TAG.match(key):
            return _decode_tagged(key, arg, get_tensor, depth)
    return {k: decode(v, get_tensor, depth + 1) for k, v in node.items()}


def _decode_tagged(tag: str, arg: Json, get_tensor: GetTensor, depth: int) -> Any:
    try:
        return _decode_tag(tag, arg, get_tensor, depth)
    except CorruptCheckpointError:
        raise
    except (ValueError, TypeError, OverflowError, AttributeError) as exc:  # crafted tag arguments
        raise CorruptCheckpointError(f"malformed {tag} in state tree ({type(exc).__name__}: {exc})") from None


def _decode_tag(tag: str, arg: Json, get_tensor: GetTensor, depth: int) -> Any:
    if tag == "__tensor__":
        return get_tensor(_expect(arg, str, tag))
    if tag == "__ndarray__":
        tensor = get_tensor(_expect(arg, str, tag))
        loaded = sys.modules.get("torch")  # a tensor comes from an imported torch; inspection passes placeholders
        return tensor.numpy() if loaded is not None and isinstance(tensor, loaded.Tensor) else tensor
    if tag == "__int__":
        text = _expect(arg, str, tag)
        try:
            if len(text) > _MAX_INT_HEX:
                raise ValueError
            return int(text, 16)
        except ValueError:
            raise CorruptCheckpointError("malformed __int__ in state tree") from None
    if tag == "__float__":
        name = _expect(arg, str, tag)
        if name not in _NONFINITE:
            raise CorruptCheckpointError(f"unknown non-finite float {name!r}")
        return _NONFINITE[name]
    if tag == "__tuple__":
        return tuple(decode(v, get_tensor, depth + 1) for v in _expect(arg, list, tag))
    if tag == "__dict__":
        return _decode_items(_expect(arg, list, tag), get_tensor, depth)
    if tag == "__namespace__":
        return argparse.Namespace(**_expect(decode(arg, get_tensor, depth + 1), dict, tag))
    if tag == "__npscalar__":
        parts = _expect(arg, list, tag)
        if len(parts) != 2:
            raise CorruptCheckpointError("malformed __npscalar__ in state tree: expected [dtype, value]")
        dtype, inner = parts
        return _decode_npscalar(dtype, decode(inner, get_tensor, depth + 1))
    if tag == "__dtype__":
        name = _expect(arg, str, tag)
        if name not in _torch_dtypes():
            raise CorruptCheckpointError(f"unknown torch dtype {name!r}")
        return _torch_dtypes()[name]
    if tag == "__size__":
        import torch

        return torch.Size([_expect(v, int, tag) for v in _expect(arg, list, tag)])
    if tag == "__bytes__":
        return base64.b64decode(_expect(arg, str, tag), validate=True)
    raise CorruptCheckpointError(f"unknown tag {tag!r} in state tree (written by a newer unbroken?)")


def _decode_items(items: list[Json], get_tensor: GetTensor, depth: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for item in items:
        if not (isinstance(item, list) and len(item) == 2):
            raise CorruptCheckpointError("malformed '__dict__' entry in state tree: expected [key, value]")
        key = decode(item[0], get_tensor, depth + 1)
        try:
            out[key] = decode(item[1], get_tensor, depth + 1)
        except TypeError as exc:  # an unhashable key (a list) in a crafted manifest
            raise CorruptCheckpointError(f"unhashable dict key {key!r} in state tree") from exc
    return out


def _decode_npscalar(dtype: Any, value: Any) -> Any:
    import numpy as np

    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise CorruptCheckpointError(f"invalid NumPy scalar dtype {dtype!r}") from exc
    if np_dtype.kind not in "biuf":
        raise CorruptCheckpointError(f"NumPy scalar dtype {dtype!r} is not numeric")
    if not isinstance(value, (int, float)) or isinstance(value, bool) != (np_dtype.kind == "b"):
        raise CorruptCheckpointError(f"NumPy scalar of dtype {dtype!r} holds a {type(value).__name__}")
    return np_dtype.type(value)


def _expect(value: Any, kind: type, tag: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptCheckpointError(f"malformed {tag} in state tree: expected {kind.__name__}")
    return value
