"""Accelerate: one object gives an ``Accelerator`` training loop unbroken's checkpoints and a bit-exact resume.

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ckpt = Checkpointing(accelerator, "runs/exp1", every_steps=500, keep_last=3)
    step = ckpt.restore()                  # 0, or the step of the newest valid checkpoint
    while step < total_steps:
        for batch in loader:               # a resumed run continues mid-epoch, at the next batch
            ...                            # forward, accelerator.backward, optimizer.step
            step += 1
            ckpt.step(step)                # saves when the schedule says so
            if step == total_steps:
                break
    ckpt.close()

How it fits into Accelerate (tested with accelerate 1.15; docs/INTEGRATIONS.md):

* :class:`Checkpointing` is a :class:`unbroken.CheckpointManager` (same options, same methods) whose
  state is, unless given, every object ``accelerator.prepare`` returned (models, optimizers,
  schedulers, dataloaders) and those passed to ``register_for_checkpointing``, plus the
  ``accelerate`` entry: ``accelerator.step`` (the gradient-accumulation counter) and the mixed
  precision ``GradScaler``.  Models are saved unwrapped (no DDP ``module.`` prefix), so
  ``unbroken export`` and ``read_state_dict`` give the plain model's weights.
* Data position: the plain loader inside each prepared ``DataLoaderShard`` is made resumable in place
  (:func:`unbroken.make_resumable`).  The shard already saves and loads its inner loader's state (it
  does for torchdata's ``StatefulDataLoader``), snapshotted before each batch it yields, so its
  one-batch look-ahead does not count; a restore also sets the shard's epoch counter.  Do not call
  ``accelerator.skip_first_batches``: the restored loader already starts at the next batch.
* RNG: the manager saves and restores Python's, NumPy's and torch's streams (CUDA's too) with the
  checkpoint.  Across ranks, the data order's seed is drawn from the generator Accelerate keeps in
  sync, after synchronising it.
* Nothing is pickled (Accelerate's own ``save_state`` pickles RNG states and custom objects); its
  ``save_state``/``load_state`` are left as they are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

import unbroken

try:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType, RNGType, synchronize_rng_state  # type: ignore[import-untyped]
except ImportError as _missing:  # pragma: no cover (the extra is installed where the tests run)
    raise ImportError('unbroken.integrations.accelerate needs Hugging Face Accelerate: '
                      f'pip install "unbroken[accelerate]" ({_missing})') from _missing

__all__ = ["Checkpointing"]

_ACCELERATOR = "accelerate"
# Each rank holds a whole replica of the model and optimizer: what a CheckpointManager saves.
_SUPPORTED = frozenset({DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU,
                        DistributedType.MULTI_NPU, DistributedType.MULTI_MLU, DistributedType.MULTI_SDAA,
                        DistributedType.MULTI_MUSA, DistributedType.MULTI_XPU, DistributedType.MULTI_HPU})


class Checkpointing(unbroken.CheckpointManager):
    """Crash-safe, bit-exact checkpoints of an Accelerate training loop, in an unbroken run directory.

    ``accelerator``: the ``Accelerator``, after ``prepare``.  ``directory``: the run directory (a
    path, or a URL with ``storage_options``).  ``state``: names -> objects to save (the prepared
    model, optimizer, dataloader, ...); by default every object ``prepare`` returned, named
    ``model``, ``optimizer``, ``scheduler``, ``dataloader`` (``model_1``, ... for further ones) and
    ``custom``, ``custom_1``, ... for ``register_for_checkpointing``.  Every other keyword is a
    :class:`unbroken.CheckpointManager` option (``every_steps``, ``keep_last``, ``async_save``,
    ``mirror_to``, ``max_runtime``, ...).  Build it on every rank, before the first batch.
    """

    def __init__(self, accelerator: Accelerator, directory: str | os.PathLike[str],
                 state: Mapping[str, Any] | None = None, *, storage_options: dict[str, Any] | None = None,
                 mirror_options: dict[str, Any] | None = None, **options: Any) -> None:
        if not isinstance(accelerator, Accelerator):
            raise TypeError(f"Checkpointing() takes the Accelerator first, got {type(accelerator).__name__}: "
                            "Checkpointing(accelerator, 'runs/exp1', ...)")
        _check_distributed(accelerator)
        entries = dict(state) if state is not None else prepared_objects(accelerator)
        if _ACCELERATOR in entries:
            raise ValueError(f"state entry {_ACCELERATOR!r} is reserved for the Accelerator's own counters; "
                             "rename yours")
        if not entries:
            raise ValueError("nothing to checkpoint: call accelerator.prepare(model, optimizer, dataloader) "
                             "before Checkpointing(...), or pass state={'model': model, ...}")
        entries = {name: _unwrapped(accelerator, value) for name, value in entries.items()}
        for value in entries.values():
            _make_loader_resumable(accelerator, value)
        entries[_ACCELERATOR] = AcceleratorCounters(accelerator)
        self.accelerator = accelerator
        super().__init__(directory, entries, storage_options=storage_options, mirror_options=mirror_options,
                         **options)


class AcceleratorCounters:
    """The ``accelerate`` state entry: what ``Accelerator.save_state`` saves besides the prepared objects
    and the RNG streams: the gradient-accumulation step and the mixed-precision scaler."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {"step": int(self.accelerator.step), "scaler": None if scaler is None else scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.step = int(state["step"])
        scaler, saved = self.accelerator.scaler, state.get("scaler")
        if (scaler is None) != (saved is None):
            raise unbroken.StateMismatchError(
                "mixed precision differs from the saved run (a GradScaler on one side only): resume with the "
                "same Accelerator(mixed_precision=...)")
        if scaler is not None:
            scaler.load_state_dict(saved)


def prepared_objects(accelerator: Accelerator) -> dict[str, Any]:
    """Every object ``accelerator.prepare`` returned and every one given to ``register_for_checkpointing``,
    by name: what ``Accelerator.save_state`` saves."""
    found: dict[str, Any] = {}
    groups = (("model", accelerator._models), ("optimizer", accelerator._optimizers),
              ("scheduler", accelerator._schedulers), ("dataloader", accelerator._dataloaders),
              ("custom", accelerator._custom_objects))
    for name, objects in groups:
        for i, obj in enumerate(objects):
            found[name if i == 0 else f"{name}_{i}"] = obj
    return found


def _check_distributed(accelerator: Accelerator) -> None:
    kind = accelerator.distributed_type
    if kind not in _SUPPORTED:
        raise ValueError(f"Checkpointing supports one process and data-parallel (DDP) runs, not {kind.value}: "
                         "FSDP, DeepSpeed, Megatron-LM and XLA shard or own the model state. Fix: use "
                         "Accelerate's own save_state/load_state for those")


def _unwrapped(accelerator: Accelerator, value: Any) -> Any:
    """A prepared model without its DDP/compile wrappers: the same parameters, plain names."""
    if isinstance(value, torch.nn.Module):
        return accelerator.unwrap_model(value, keep_torch_compile=False)
    return value


def _make_loader_resumable(accelerator: Accelerator, value: Any) -> None:
    """Convert a prepared loader (a ``DataLoaderShard``) before the manager sees it: across ranks its
    data order's seed is drawn from the generator Accelerate synchronises, so that is synchronised
    first.  Plain loaders are the manager's to convert."""
    if not isinstance(value, torch.utils.data.DataLoader) or "base_dataloader" not in vars(value):
        return
    generator = getattr(value, "synchronized_generator", None)
    if accelerator.num_processes > 1 and isinstance(generator, torch.Generator):
        synchronize_rng_state(RNGType.GENERATOR, generator=generator)
    unbroken.make_resumable(value)
