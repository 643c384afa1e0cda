"""PyTorch Lightning: one callback gives a ``Trainer`` unbroken's checkpoints and a bit-exact resume.

    trainer = L.Trainer(max_steps=10_000, callbacks=[Unbroken("runs/exp1", every_steps=500, keep_last=3)])
    trainer.fit(model, ckpt_path="last")

How it fits into Lightning (2.4 or newer):

* :class:`Unbroken` is a ``ModelCheckpoint``, so ``ckpt_path="last"`` finds it: its "last checkpoint"
  is the run directory, which Lightning then asks the strategy's ``CheckpointIO`` to load.  In
  ``setup`` the callback wraps that ``CheckpointIO``: the run directory loads as its newest *valid*
  checkpoint (corrupt ones are set aside and the previous one is used), a ``step_*`` directory loads
  exactly, anything else (a Lightning ``.ckpt``) goes to the wrapped one.
* Saving: at ``on_train_batch_end`` after each optimizer step, ``CheckpointManager.step(global_step)``
  decides (``every_steps``, ``every_minutes``, stop signals, deadlines).  A save holds two entries:
  ``model`` (the LightningModule: saved once under DDP, what ``unbroken export`` and
  ``read_state_dict`` read) and ``lightning``, the rest of the dict ``Trainer.save_checkpoint`` would
  write (loop progress, optimizers, schedulers, callbacks, precision plugin, data position) as typed
  values: no pickle.  Lightning's restart logic for a save made at ``on_train_batch_end`` (what its own
  ``ModelCheckpoint(every_n_train_steps=...)`` does) continues mid-epoch.
* Data position: the strategy's ``process_dataloader`` hook converts the training DataLoader in place
  with :func:`unbroken.make_resumable` after Lightning added its samplers, so Lightning's own loop
  state saves and restores the loader's position (Lightning does that for loaders with
  ``state_dict``/``load_state_dict`` only).
* RNG: the manager restores the streams when the checkpoint is loaded, early in ``fit``; Lightning then
  builds dataloaders and may draw random numbers before training continues, so the restored streams
  are put back at ``on_train_start``, right before the first resumed batch.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import signal
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

import unbroken

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
    from lightning.pytorch.trainer.states import RunningStage
except ImportError as _missing:  # pragma: no cover (the extra is installed where the tests run)
    raise ImportError('unbroken.integrations.lightning needs PyTorch Lightning: pip install "unbroken[lightning]"'
                      f" ({_missing})") from _missing

__all__ = ["Unbroken"]

_MODEL, _TRAINER = "model", "lightning"
# Options the callback applies itself: the manager's own version would act at the wrong moment.
_OWN_OPTIONS = frozenset({"save_on_close"})
_HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def _option_names() -> set[str]:
    params = inspect.signature(unbroken.CheckpointManager.__init__).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


class Unbroken(ModelCheckpoint):
    """Crash-safe, bit-exact checkpoints for a Lightning ``Trainer``, in an unbroken run directory.

    ``directory``: the run directory (a path, or a URL with ``storage_options``).  Every other
    keyword is a :class:`unbroken.CheckpointManager` option with the same name and meaning
    (``every_steps``, ``keep_last``, ``async_save``, ``mirror_to``, ``max_runtime``, ...).  Steps are
    Lightning's ``global_step`` (optimizer steps).  ``save_on_close`` saves the last step of ``fit``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                 mirror_options: dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__(save_top_k=0, save_last=False)
        unknown = sorted(set(options) - _option_names())
        if unknown:
            raise TypeError(f"Unbroken() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            "it takes the options of unbroken.CheckpointManager (help(unbroken.CheckpointManager))")
        self.directory = os.fspath(directory)
        self._storage_options, self._mirror_options = storage_options, mirror_options
        self._save_on_close = bool(options.get("save_on_close", True))
        self._options = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
        self._capture_rng = bool(options.get("capture_rng", True))
        self._manager: unbroken.CheckpointManager | None = None
        self._state: _TrainerState | None = None
        self._io: _UnbrokenIO | None = None
        self._stop_handlers: dict[int, Any] = {}
        self._restored_rng: tuple[Any, ...] | None = None
        self._last_step: int | None = None
        self._saved_step: int | None = None

    @property
    def state_key(self) -> str:
        return f"Unbroken{{'directory': {self.directory!r}}}"

    # -- where "last" is ---------------------------------------------------------------------------
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:  # noqa: ARG002 (Lightning's signature)
        """The run directory, when it (or the mirror) holds a checkpoint: loading it resumes from the
        newest valid one.  Empty when there is none, so ``ckpt_path="last"`` starts from scratch."""
        if not (self._has_checkpoints(self.directory, self._storage_options)
                or self._mirror_has_checkpoints()):
            return set()
        if "://" not in self.directory:
            os.makedirs(self.directory, exist_ok=True)  # checkpoints only in the mirror: a new machine
        return {self.directory}

    @staticmethod
    def _has_checkpoints(directory: str, storage_options: dict[str, Any] | None) -> bool:
        if "://" not in directory and not os.path.isdir(directory):
            return False
        try:
            return bool(unbroken.list_checkpoints(directory, storage_options=storage_options))
        except (OSError, unbroken.UnbrokenError):
            return False

    def _mirror_has_checkpoints(self) -> bool:
        mirror = self._options.get("mirror_to")
        return isinstance(mirror, str) and self._has_checkpoints(mirror, self._mirror_options)

    # -- lifetime -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy)
        self._state = _TrainerState(trainer)
        before = _handlers()
        self._manager = unbroken.CheckpointManager(
            self.directory, {_MODEL: pl_module, _TRAINER: self._state}, storage_options=self._storage_options,
            mirror_options=self._mirror_options, save_on_close=False, **self._options)
        self._stop_handlers = {sig: h for sig, h in _handlers().items() if h is not before.get(sig)}
        self._io = _UnbrokenIO(trainer.strategy.checkpoint_io, self)
        trainer.strategy.checkpoint_io = self._io
        _convert_training_loaders(trainer)
        self._last_step = self._saved_step = None
        self._restored_rng = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: ARG002
        # Lightning composes its own SIGTERM handler on top of ours at the start of fit; it would end
        # the run at the next batch without a checkpoint.  The manager's stop saves first, then exits.
        for sig, handler in self._stop_handlers.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        if self._restored_rng is not None:
            _set_rng(self._restored_rng)
            self._restored_rng = None
        if self._state is not None:
            self._state.live = True
        self._last_step = trainer.global_step

    # Hook parameters keep Lightning's names (it passes some by keyword), used or not.
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,  # noqa: ARG002
                           batch: Any, batch_idx: int) -> None:  # noqa: ARG002
        manager = self._manager
        step = trainer.global_step
        if manager is None or step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation): nothing new to save
        self._last_step = step
        if manager.step(step, metrics=_metrics(trainer)):
            self._saved_step = step
        if self._save_on_close and self._saved_step != step and _ends_after_this_batch(trainer):
            try:
                manager.save(step, wait=False)
                self._saved_step = step
            except unbroken.CheckpointExistsError as exc:
                warnings.warn(f"the last step was not saved: {exc}", RuntimeWarning, stacklevel=2)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,  # noqa: ARG002
                     exception: BaseException) -> None:
        """The state may be mid-step: nothing more is saved; a save in flight (a whole step) commits."""
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.__exit__(type(exception), exception, exception.__traceback__)
        self._detach(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: ARG002
        manager, self._manager = self._manager, None
        try:
            if manager is not None:
                manager.close()  # waits for the save in flight
        finally:
            self._detach(trainer)

    def _detach(self, trainer: pl.Trainer) -> None:
        if self._state is not None:
            self._state.live = False
        if self._io is not None and trainer.strategy.checkpoint_io is self._io:
            trainer.strategy.checkpoint_io = self._io.inner
        self._io = None
        trainer.strategy.__dict__.pop("process_dataloader", None)

    # -- ModelCheckpoint's own saving is replaced by the manager's --------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    # -- loading (called by the CheckpointIO wrapper) --------------------------------------------------
    def owns(self, path: str | os.PathLike[str]) -> bool:
        return _same_path(path, self.directory) or unbroken.is_checkpoint(path, self._storage_options)

    def load(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The Lightning checkpoint dict of the newest valid checkpoint (``path`` is the run directory)
        or of the checkpoint at ``path``; the model is already loaded, the RNG streams are kept for
        ``on_train_start``."""
        manager, state = self._manager, self._state
        if manager is None or state is None:
            raise RuntimeError("Unbroken: a checkpoint can be loaded only during Trainer.fit (the callback "
                               "opens its run directory in setup)")
        if _same_path(path, self.directory):
            if manager.restore() == 0:
                raise unbroken.CheckpointNotFoundError(
                    f"no valid checkpoint in {self.directory}: every one failed verification (set aside "
                    "as corrupt, see the warnings). Fix: pass ckpt_path=None to start from scratch")
        else:
            manager.restore(path=path)
        if state.loaded is None:
            raise unbroken.CorruptCheckpointError(f"{path}: not a checkpoint written by unbroken's Lightning "
                                                  f"callback (no {_TRAINER!r} entry)")
        if self._capture_rng:
            self._restored_rng = _get_rng()
        checkpoint = dict(state.loaded)
        state.loaded = None
        checkpoint["state_dict"] = state.trainer.lightning_module.state_dict()
        return checkpoint


class _TrainerState:
    """The ``lightning`` state entry: what ``Trainer.save_checkpoint`` writes, less the model weights."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.live = False  # dumped only while training runs (not when the manager plans its buffers)
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if not self.live:
            return {}
        # Lightning's weights_only=False here means "with optimizer and loop state": it builds the dict
        # Trainer.save_checkpoint would write, in memory. Nothing is unpickled; the dict is stored as typed values.
        checkpoint = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        checkpoint.pop("state_dict", None)  # the "model" entry
        for key in _HPARAM_KEYS:
            if key in checkpoint and not _plain(checkpoint[key]):
                # Hyper-parameters are for load_from_checkpoint; resuming never reads them.
                warnings.warn(f"Unbroken: {key} hold values that cannot be stored without pickle (objects, "
                              "functions); they are left out of the checkpoint (resuming does not use them)",
                              UserWarning, stacklevel=2)
                del checkpoint[key]
        return checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


class _UnbrokenIO(CheckpointIO):
    """The strategy's CheckpointIO, with unbroken's run directory and checkpoints loaded by the callback."""

    def __init__(self, inner: CheckpointIO, callback: Unbroken) -> None:
        self.inner, self.callback = inner, callback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        if self.callback.owns(path):
            return self.callback.load(path)
        # A path that is not ours (the user's own .ckpt) is Lightning's to load, exactly as without the adapter.
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _check_strategy(strategy: Any) -> None:
    if isinstance(strategy, SingleDeviceStrategy) or type(strategy) is DDPStrategy:
        return
    raise ValueError(f"Unbroken supports the single-device and DDP strategies, not {type(strategy).__name__} "
                     "(its model and optimizer state are sharded); use strategy='ddp' or one device")


def _convert_training_loaders(trainer: pl.Trainer) -> None:
    """Make the training DataLoaders resumable in place, after Lightning added its samplers and before
    it loads their saved state and iterates them: its loop state then carries their position."""
    strategy = trainer.strategy
    original: Callable[[object], object] = strategy.process_dataloader

    def process_dataloader(dataloader: object) -> object:
        dataloader = original(dataloader)
        # A loader with a state of its own (unbroken.DataLoader, torchdata's StatefulDataLoader) is kept.
        if (trainer.state.stage == RunningStage.TRAINING and isinstance(dataloader, torch.utils.data.DataLoader)
                and not callable(getattr(dataloader, "state_dict", None))):
            return unbroken.make_resumable(dataloader)
        return dataloader

    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]


def _ends_after_this_batch(trainer: pl.Trainer) -> bool:
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return bool(last_epoch and trainer.is_last_batch)


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    """Scalar logged metrics, for ``keep_best``/``best_metric`` and ``unbroken ls``."""
    found: dict[str, float] = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            found[name] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def _plain(value: Any, depth: int = 0) -> bool:
    """A value unbroken stores exactly as typed JSON (what hyper-parameters usually are)."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype)):
        return True
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, (str, int)) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, argparse.Namespace):
        return _plain(vars(value), depth + 1)
    return False


def _handlers() -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}


def _get_rng() -> tuple[Any, ...]:
    initialised = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda = torch.cuda.get_rng_state_all() if initialised else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng(streams: tuple[Any, ...]) -> None:
    python, numpy_state, torch_state, cuda = streams
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _same_path(path: str | os.PathLike[str], directory: str) -> bool:
    text = os.fspath(path)
    if "://" in text or "://" in directory:
        return text.rstrip("/") == directory.rstrip("/")
    return os.path.abspath(text) == os.path.abspath(directory)
