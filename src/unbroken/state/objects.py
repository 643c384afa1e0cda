"""What kind of thing each state entry is, and the unwrapping of training wrappers."""

from __future__ import annotations

import argparse
import enum
from typing import Any

import torch
from torch import nn

__all__ = ["Kind", "classify", "unwrap_module", "RESERVED_PREFIX"]

RESERVED_PREFIX = "unbroken."


class Kind(str, enum.Enum):
    MODULE = "module"        # nn.Module: keys/shapes/dtypes are checked before loading
    OPTIMIZER = "optimizer"  # torch.optim.Optimizer: param-group structure is checked
    STATEFUL = "stateful"    # anything else with state_dict()/load_state_dict()
    VALUE = "value"          # a plain value (epoch, args, config), restored into the state dict
    RNG = "rng"              # the automatically captured random streams


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's model under DDP/DataParallel and ``torch.compile`` wrappers.

    Checkpoints store the unwrapped names (no ``module.`` / ``_orig_mod.`` prefixes), so a checkpoint
    moves freely between a compiled, a DDP-wrapped and a plain model.
    """
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod  # type: ignore[assignment]
        else:
            return module


def classify(value: Any) -> Kind:
    if isinstance(value, nn.Module):
        return Kind.MODULE
    if isinstance(value, torch.optim.Optimizer):
        return Kind.OPTIMIZER
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return Kind.STATEFUL
    if isinstance(value, argparse.Namespace) or not callable(value):
        return Kind.VALUE
    raise TypeError  # handled by the caller, which knows the key
