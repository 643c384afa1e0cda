"""Shared test helpers: exact comparison and builders of small, real training objects.

Everything here is deterministic given a seed, so "the same object built twice" is bitwise identical
and "a fresh object" (another seed) differs from the saved one in every parameter.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from unbroken import CheckpointManager
from unbroken.format import seal
from unbroken.storage import Storage

__all__ = [
    "assert_exactly_equal", "exactly_equal", "snapshot", "make_mlp", "train", "make_optimizer",
    "make_scheduler", "make_scaler", "make_ema", "TensorBag", "OPTIMIZERS", "SCHEDULERS",
    "make_state", "make_training_state", "SyncManager", "commit_files", "FakeClock", "wait_until",
]


# --------------------------------------------------------------------------------------------------
# exact comparison
# --------------------------------------------------------------------------------------------------

def _key(key: Any) -> str:
    """repr() of an int over 4300 digits raises; paths only need to be readable."""
    return f"<int of {key.bit_length()} bits>" if isinstance(key, int) and key.bit_length() > 64 else repr(key)


def assert_exactly_equal(a: Any, b: Any, path: str = "") -> None:
    """``a`` and ``b`` are equal type for type at every level.

    Tensors: same dtype, shape, device and bits (NaN payloads included). Floats: bitwise (so
    ``nan == nan`` and ``0.0 != -0.0``). Dicts: same keys in the same order with the same key types.
    NumPy arrays: same dtype, shape and bytes. NumPy scalars: same dtype and bits.
    """
    where = path or "<root>"
    assert type(a) is type(b), f"{where}: type {type(a).__name__} != {type(b).__name__} ({a!r:.80} vs {b!r:.80})"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.device == b.device, f"{where}: device {a.device} != {b.device}"
        assert a.requires_grad == b.requires_grad, f"{where}: requires_grad differs"
        assert _tensor_bytes(a) == _tensor_bytes(b), f"{where}: tensor values differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{where}: array values differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.tobytes() == b.tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, float):
        assert _float_bits(a) == _float_bits(b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_exactly_equal(x, y, f"{path}/{i}")
    elif isinstance(a, argparse.Namespace):
        assert_exactly_equal(vars(a), vars(b), f"{path}(namespace)")
    elif isinstance(a, Mapping):
        ka, kb = list(a.keys()), list(b.keys())
        assert len(ka) == len(kb), f"{where}: keys {ka!r:.200} != {kb!r:.200}"
        for x, y in zip(ka, kb):
            assert_exactly_equal(x, y, f"{path}(key {_key(x)})")
        for k in ka:
            assert_exactly_equal(a[k], b[k], f"{path}/{_key(k)}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def exactly_equal(a: Any, b: Any) -> bool:
    try:
        assert_exactly_equal(a, b)
    except AssertionError:
        return False
    return True


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _float_bits(x: float) -> bytes:
    import struct
    if math.isnan(x):
        return b"nan"  # every NaN is "the same" Python float for our purposes
    return struct.pack("<d", x)


def snapshot(obj: Any) -> Any:
    """A deep, independent copy of ``obj.state_dict()`` (or of ``obj`` for plain values)."""
    value = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
    return copy.deepcopy(value)


# --------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------

def make_mlp(seed: int = 0, width: int = 8, extra_layer: bool = False) -> nn.Sequential:
    """A tiny MLP with BatchNorm (buffers, an int64 ``num_batches_tracked``, versioned metadata)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 3)]
    if extra_layer:
        layers += [nn.ReLU(), nn.Linear(3, 3)]
    return nn.Sequential(*layers)


def train(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, steps: int = 2, seed: int = 0,
          scaler: torch.amp.GradScaler | None = None) -> None:
    """``steps`` real optimisation steps (BatchNorm running stats move; optimizer state fills)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    for _ in range(steps):
        x = torch.randn(6, first.in_features, generator=gen)
        loss = model(x).square().mean()
        if optimizer is not None:
            optimizer.zero_grad()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.8, 0.95)),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, amsgrad=True),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
}


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[kind](model)


class WarmupLambda:
    """A picklable-free LambdaLR multiplier (a plain function is stored as ``None`` by LambdaLR)."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.warmup)


def _lambda_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=WarmupLambda(3))


def _sequential_lr(opt: torch.optim.Optimizer) -> Any:
    first = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    second = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=1e-5)
    return torch.optim.lr_scheduler.SequentialLR(opt, [first, second], milestones=[2])


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
    "lambda": _lambda_lr,
    "sequential": _sequential_lr,
}


def make_scheduler(kind: str, optimizer: torch.optim.Optimizer, steps: int = 0) -> Any:
    """Scheduler ``kind`` on ``optimizer``, stepped ``steps`` times (with optimizer steps in between)."""
    sched = SCHEDULERS[kind](optimizer)
    for _ in range(steps):
        optimizer.step()  # grads are None: a no-op step, keeps torch's "step order" warning quiet
        sched.step()
    return sched


def make_scaler(trained: bool) -> torch.amp.GradScaler:
    if not trained:
        return torch.amp.GradScaler("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=4.0, backoff_factor=0.25,
                                  growth_interval=5)
    model = make_mlp(7)
    train(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=2, scaler=scaler)
    return scaler


def make_ema(model: nn.Module, decay: float = 0.999, updates: int = 0) -> AveragedModel:
    """An EMA of ``model`` (``AveragedModel`` with ``get_ema_multi_avg_fn``), updated ``updates`` times
    with ``model``'s parameters perturbed between updates so the average differs from the model."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for i in range(updates):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
        ema.update_parameters(model)
    return ema


class TensorBag:
    """A user object with ``state_dict``/``load_state_dict`` holding tensors, a NumPy array and values."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.weights = torch.randn(3, 5, generator=gen)
        self.counts = torch.randint(0, 100, (4,), generator=gen, dtype=torch.int64)
        self.mask = torch.rand(6, generator=gen) > 0.5
        self.half = torch.randn(2, 2, generator=gen).to(torch.bfloat16)
        self.histogram = rng.integers(0, 2**32, size=(3, 2), dtype=np.uint32)
        self.position = {"epoch": seed, "index": seed * 10, "order": (seed, seed + 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "counts": self.counts.clone(), "mask": self.mask.clone(),
                "half": self.half.clone(), "histogram": self.histogram.copy(),
                "position": copy.deepcopy(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.counts = state["counts"].clone()
        self.mask = state["mask"].clone()
        self.half = state["half"].clone()
        self.histogram = np.array(state["histogram"], copy=True)
        self.position = copy.deepcopy(state["position"])


def sealed_manifest(doc: dict[str, Any]) -> bytes:
    """A crafted manifest document as bytes that pass the manifest's own checksum, so a test reaches
    the validation behind it (a real attacker can recompute a CRC too)."""
    body = json.dumps({k: v for k, v in doc.items() if k != "manifest_crc32c"}, separators=(",", ":")).encode()
    return seal(body[:-1])


def reseal(raw: bytes) -> bytes:
    """``raw`` manifest bytes edited in place, with their checksum member recomputed."""
    return seal(re.sub(rb',"manifest_crc32c":[0-9]+\}\s*$', b"", raw))


# --------------------------------------------------------------------------------------------------
# manager-level states
# --------------------------------------------------------------------------------------------------

def make_state(seed: int = 0, sizes: Sequence[int] = (4, 8, 1), *,
               optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer] = torch.optim.AdamW,
               step_lr: bool = False, epoch: int | None = None) -> dict[str, Any]:
    """A small state for manager tests: ``model`` (seeded; one ``Linear`` for two ``sizes``, else
    ``Linear`` layers with ``ReLU`` between), its ``optimizer``, a ``StepLR(3, 0.5)`` under
    ``"scheduler"`` when ``step_lr``, and ``epoch`` (the seed unless given).  Modules bind their
    variant once with ``functools.partial``."""
    torch.manual_seed(seed)
    model: nn.Module
    if len(sizes) == 2:
        model = nn.Linear(sizes[0], sizes[1])
    else:
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
    opt = optimizer(model.parameters())
    state: dict[str, Any] = {"model": model, "optimizer": opt}
    if step_lr:
        state["scheduler"] = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    state["epoch"] = seed if epoch is None else epoch
    return state


def make_training_state(seed: int = 0, trained: bool = True) -> dict[str, Any]:
    """A whole training state (model, EMA, optimizer, scheduler, scaler, a user object and plain
    values).  ``trained=False`` gives fresh objects to restore into."""
    model = make_mlp(seed)
    opt = make_optimizer("adamw", model)
    if trained:
        train(model, opt, steps=2, seed=seed)
    ema = make_ema(model, 0.99, updates=2 if trained else 0)
    sched = make_scheduler("cosine", opt, steps=3 if trained else 0)
    return {
        "model": model, "ema": ema, "optimizer": opt, "scheduler": sched,
        "scaler": make_scaler(trained), "bag": TensorBag(seed),
        "epoch": 3 if trained else 0,
        "args": argparse.Namespace(lr=3e-3, betas=(0.9, 0.95), name="exp") if trained else argparse.Namespace(),
    }


def SyncManager(*args: Any, **kwargs: Any) -> CheckpointManager:  # noqa: N802 - reads like the class it builds
    """A manager whose saves are committed when ``step()``/``save()`` returns, for tests that check
    the disk right after.  The background path is covered by tests/manager/test_async_save.py."""
    kwargs.setdefault("async_save", False)
    return CheckpointManager(*args, **kwargs)


def commit_files(storage: Storage, name: str, files: dict[str, bytes], manifest: bytes = b"{}") -> None:
    """Write ``files`` into a staging area of ``storage`` and commit it as ``name`` with ``manifest``."""
    staging = storage.begin(name)
    for file_name, data in files.items():
        handle = staging.create(file_name)
        handle.write(memoryview(data))
        handle.close()
    staging.commit(manifest)


# --------------------------------------------------------------------------------------------------
# time
# --------------------------------------------------------------------------------------------------

class FakeClock:
    """A clock that moves only when told: ``clock()`` reads it, ``advance(s)`` and ``sleep(s)`` move
    it (``sleep`` also counts the calls), so time-based decisions are tested without waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "the condition") -> None:
    """Poll ``predicate`` until it is true (a subprocess wrote a file, a line appeared); fail the test
    after ``timeout`` seconds.  A deadline on an event, not a sleep that stands in for one."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
