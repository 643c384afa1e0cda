"""Helpers shared by the checkpoint benchmarks (io_bench, per_tensor, gpu_bench).

Imported as ``benchlib`` because every benchmark runs as ``python bench/NAME.py`` (bench/ is then the
first entry of ``sys.path``).  Nothing here is timed by itself; it flattens states, flushes and evicts
files, measures the peak RSS of one operation, and writes a section of bench/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"


# -- states ------------------------------------------------------------------------------------------------
class Tensors:
    """A stateful object holding a flat dict of tensors (state_dict / load_state_dict in place)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.tensors[k].copy_(v)


def flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the state under a unique dotted name (safetensors takes a flat dict)."""
    return flat_state_dicts({key: obj.state_dict() for key, obj in state.items()})


def flat_state_dicts(state_dicts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of already taken state dicts under a unique dotted name."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    for key, value in state_dicts.items():
        walk(key, value)
    return out


def nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in flat(state).values())


def as_bytes(t: torch.Tensor) -> Any:
    """A writable uint8 numpy view of a contiguous CPU tensor's memory (no copy)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


# -- memory ------------------------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRss:
    """Extra peak RSS of one operation: the high-water mark above the RSS at ``start()``.

    Linux lets a process reset its own high-water mark (``echo 5 > /proc/self/clear_refs``, since 4.0),
    so setup done before ``start()`` (building the model, an earlier operation) cannot hide the
    operation's own peak as it would with ``ru_maxrss`` (a lifetime maximum).  Where the reset is not
    permitted the fallback is ``ru_maxrss - rss()``, a lower bound, and ``method`` says so.
    """

    def __init__(self) -> None:
        self.base = 0
        self.method = "VmHWM reset via /proc/self/clear_refs"

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "ru_maxrss delta (lower bound: clear_refs not permitted)"
        self.base = rss()

    def peak(self) -> int:
        """Bytes above the starting RSS at the highest point since ``start()``."""
        high = _vm_hwm() if self.method.startswith("VmHWM") else peak_rss()
        return max(0, high - self.base)

    def kept(self) -> int:
        """Bytes still resident now above the starting RSS (what the operation left allocated)."""
        return max(0, rss() - self.base)


# -- files -------------------------------------------------------------------------------------------------
def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def fsync_tree(path: Path) -> None:
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(path: Path) -> None:
    """Flush and drop the page-cache pages of every file under ``path`` (a cold read follows)."""
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache() -> bool:
    """Empty the whole page cache (root, outside a container that forbids it); False when not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def read_all(f: Any, data: Any) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise EOFError(f"file ended after {done} of {len(view)} bytes")
        done += got


# -- statistics ---------------------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratios(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median and min-max of per-repeat ratios: each pair was measured in the same round."""
    return spread([a / b for a, b in zip(num, den, strict=True) if b > 0])


# -- provenance and recording ----------------------------------------------------------------------------------
def git_commit(src: Path | None = None) -> str:
    """Short commit of the checkout holding ``src`` (default: this repository), '+dirty' when the
    files under it differ from that commit; 'unknown' outside a git checkout."""
    where = src or ROOT / "src"
    try:
        top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        commit = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--", str(where)], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine(extra: Iterable[str] = ()) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [time.strftime("%Y-%m-%d %H:%M"), platform.machine(), f"{os.cpu_count()} cores ({cpu})",
             f"torch {torch.__version__}", f"Python {platform.python_version()}", *extra]
    return ", ".join(parts)


def record_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace the ``## heading`` section of bench/RESULTS.md (up to the next ``## ``), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
