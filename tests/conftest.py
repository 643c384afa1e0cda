"""Fixtures: tiny but real training objects (trained for 2 steps, so optimizer state exists).

Builders live in :mod:`tests.helpers` (import them directly for "a fresh object with another
seed"); the fixtures below are the common trained instances.  Checkpoints go under ``tmp_path``.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import TensorBag, make_ema, make_mlp, make_optimizer, make_scaler, make_scheduler, train
from tests.s3server import s3_run, s3_server  # noqa: F401  (fixtures: a real S3 API on 127.0.0.1)
from unbroken._internal import failpoints

# Managers install handlers for these (stop requests) and chain to the ones below; the supervisor
# installs its own.  A handler left behind by one test would sit under the next test's manager.
_GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _keep_signal_handlers_and_failpoints() -> Iterator[None]:
    """Each test starts with the handlers the worker started with and with no fault armed in-process,
    whatever an earlier test in the same xdist worker installed, armed or failed to close."""
    handlers = {sig: signal.getsignal(sig) for sig in _GUARDED_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a blocked signal is inherited by every child
    yield
    failpoints.arm(None)
    for sig, handler in handlers.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture(autouse=True)
def _keep_global_rng() -> Any:
    """Tests draw from and restore the global random streams; leave them as we found them."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(pt)


@pytest.fixture
def ckpt_path(tmp_path: Path) -> Path:
    """Where a one-shot checkpoint goes (does not exist yet)."""
    return tmp_path / "ck"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory for a CheckpointManager (does not exist yet)."""
    return tmp_path / "run"


@pytest.fixture
def mlp() -> nn.Sequential:
    """A small MLP with BatchNorm after 2 AdamW steps (running stats moved)."""
    model = make_mlp(0)
    train(model, make_optimizer("adamw", model))
    return model


@pytest.fixture
def fresh_mlp() -> nn.Sequential:
    """Same architecture as ``mlp``, different initialisation, never trained."""
    return make_mlp(1)


def _trained_optimizer(kind: str) -> torch.optim.Optimizer:
    model = make_mlp(0)
    opt = make_optimizer(kind, model)
    train(model, opt, steps=2)
    return opt


@pytest.fixture
def adam() -> torch.optim.Optimizer:
    return _trained_optimizer("adam")


@pytest.fixture
def adamw() -> torch.optim.Optimizer:
    return _trained_optimizer("adamw")


@pytest.fixture
def sgd_momentum() -> torch.optim.Optimizer:
    return _trained_optimizer("sgd_momentum")


@pytest.fixture(params=["adam", "adamw", "sgd_momentum"])
def optimizer(request: pytest.FixtureRequest) -> torch.optim.Optimizer:
    """Each supported optimizer kind, after 2 real steps (Adam/AdamW state holds ``step`` tensors)."""
    return _trained_optimizer(request.param)


def _stepped_scheduler(kind: str) -> Any:
    model = make_mlp(0)
    opt = make_optimizer("adam", model)
    train(model, opt, steps=2)
    return make_scheduler(kind, opt, steps=3)


@pytest.fixture
def step_lr() -> Any:
    return _stepped_scheduler("step")


@pytest.fixture
def cosine_lr() -> Any:
    return _stepped_scheduler("cosine")


@pytest.fixture
def onecycle_lr() -> Any:
    return _stepped_scheduler("onecycle")


@pytest.fixture
def lambda_lr() -> Any:
    return _stepped_scheduler("lambda")


@pytest.fixture
def sequential_lr() -> Any:
    return _stepped_scheduler("sequential")


@pytest.fixture
def grad_scaler() -> torch.amp.GradScaler:
    """A CPU GradScaler with non-default settings that has done 2 scaled steps."""
    return make_scaler(trained=True)


@pytest.fixture
def ema() -> Any:
    """``AveragedModel`` EMA (``get_ema_multi_avg_fn(0.999)``) of the trained ``mlp``, updated twice."""
    model = make_mlp(0)
    train(model, make_optimizer("adamw", model))
    return make_ema(model, 0.999, updates=2)


@pytest.fixture
def tensor_bag() -> TensorBag:
    return TensorBag(0)
