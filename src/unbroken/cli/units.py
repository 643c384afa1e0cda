"""One unit convention for every size the CLI prints: decimal SI, 1 kB = 1000 B, 1 MB = 10**6 B
(as tqdm's ``unit_scale`` and the Hugging Face tools count), so a checkpoint has the same size in
``ls``, ``show``, ``cp``, ``verify`` and in a progress bar."""

from __future__ import annotations

__all__ = ["UNIT_DIVISOR", "format_size"]

UNIT_DIVISOR = 1000
"""What progress bars pass to tqdm as ``unit_divisor``: the same convention as ``format_size``."""

_UNITS = ("kB", "MB", "GB", "TB", "PB", "EB")


def format_size(n: int) -> str:
    """``n`` bytes as text: ``"999 B"``, ``"1.0 kB"``, ``"384.1 MB"``; beyond exabytes in EB.  A
    manifest may claim any integer, so sizes too large for a float print as plain bytes."""
    if n < UNIT_DIVISOR:
        return f"{n} B"
    for power, unit in enumerate(_UNITS, start=1):
        if n < UNIT_DIVISOR ** (power + 1) or unit == _UNITS[-1]:
            try:
                return f"{n / UNIT_DIVISOR ** power:.1f} {unit}"
            except OverflowError:
                break
    return f"{n} B"
