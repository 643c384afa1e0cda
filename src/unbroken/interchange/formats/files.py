"""Reading foreign checkpoint files without running code from them.

``torch.load`` is only ever called with ``weights_only=True``: a full unpickle runs whatever code the
file names, so importing a file from an untrusted source with it would let that source run code on
this machine.  A file that needs more gets an error naming the type it holds and the ways out.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["load_torch_file", "load_safetensors", "numpy_arrays_allowed"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_file(path: str) -> Any:
    """The contents of a ``torch.save`` file, weights-only, on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(_needs_full_unpickling(path, str(exc))) from None
    except RuntimeError as exc:  # not a torch.save file at all (a zip without data.pkl, a text file)
        raise ValueError(f"{path}: not a checkpoint torch.load can read ({exc}). Fix: pass a file written "
                         "by torch.save, a .safetensors file, or a directory of such files") from None


def _needs_full_unpickling(path: str, message: str) -> str:
    found = _GLOBAL.search(message)
    what = f"a {found.group(1)} object" if found else "an object that weights-only unpickling cannot build"
    allow = (f"torch.serialization.add_safe_globals([{found.group(1)}])" if found
             else "torch.serialization.add_safe_globals([...the types it names...])")
    return (f"{path} holds {what}, and unbroken loads foreign files only with torch.load(weights_only=True), "
            "which builds tensors and plain values but never calls code the file names. Fix: re-save only the "
            "state_dicts and plain values (e.g. torch.save({'model': model.state_dict(), 'optimizer': "
            "optimizer.state_dict(), 'epoch': epoch}), with an argparse.Namespace as vars(args)); or, if you "
            f"trust the file and where it came from, call {allow} in Python and then "
            "unbroken.import_checkpoint(...). Allowing a type is your decision: unpickling a file from an "
            "untrusted source can run any code it names")


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"{path} is a safetensors file, which needs the safetensors package. "
                          "Fix: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


@contextmanager
def numpy_arrays_allowed() -> Iterator[None]:
    """Weights-only loading that also builds NumPy arrays (data, no code): what the Hugging Face Trainer
    allows when it reads its own ``rng_state.pth`` (NumPy's generator state is an array)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        yield
