"""Shared hypothesis settings of the parser fuzz tests.

CI runs 200 derandomized examples per test (reproducible).  ``bench/fuzz_parsers.py`` sets
``UNBROKEN_FUZZ_EXAMPLES`` to run many more, randomized, so each soak explores new inputs
(hypothesis prints the seed and the failing example to replay one).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("UNBROKEN_FUZZ_EXAMPLES", "200"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize="UNBROKEN_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow], database=None)


def mutate(data: st.DataObject, raw: bytes, truncate: bool = False) -> bytes:
    """``raw`` after 1 to 4 random byte edits (flip a bit, set, delete, insert a JSON-ish byte and,
    with ``truncate``, cut the rest off; a cut never leaves it empty: it then holds ``{``)."""
    out = bytearray(raw)
    ops = ["flip", "set", "delete", "insert"] + (["truncate"] if truncate else [])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(out) - 1))
        op = data.draw(st.sampled_from(ops))
        if op == "flip":
            out[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            out[pos] = data.draw(st.integers(0, 255))
        elif op == "delete" and len(out) > 1:
            del out[pos]
        elif op == "truncate":
            del out[pos:]
            if not out:
                out += b"{"
        else:
            out.insert(pos, data.draw(st.sampled_from(b'0123456789-.,:[]{}"eE ')))
    return bytes(out)
