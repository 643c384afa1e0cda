"""The Hugging Face ``Trainer`` on unbroken checkpoints: one added line, bit-exact resume.

    trainer = Trainer(model=model, args=args, train_dataset=train_ds)
    trainer = unbroken.integrations.transformers.resumable(trainer, "runs/exp1", keep_last=3)
    trainer.train(resume_from_checkpoint=True)     # or train(): the run directory continues either way

``resumable`` gives the trainer a subclass of its own class.  Its ``train()`` opens a
:class:`unbroken.CheckpointManager` for the call and restores the newest valid checkpoint before the
Trainer starts; the objects the Trainer creates later (optimizer, scheduler, scaler) and the random
streams get their state at the Trainer's own load points, in its own order, and the Trainer reads the
restored ``TrainerState`` from a ``trainer_state.json`` in a temporary folder, then skips the batches
already trained, as in its own resume.  The manager sees every step once, after the Trainer logged and
evaluated.  Nothing is pickled.  docs/INTEGRATIONS.md says what is exact and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import logging
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

import unbroken

try:
    import transformers
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState, TrainerState
except ImportError as exc:  # transformers missing, or its Trainer's own dependency (accelerate)
    raise ImportError('unbroken.integrations.transformers needs the Hugging Face Trainer: '
                      f'pip install "unbroken[transformers]" ({exc})') from exc

__all__ = ["resumable", "Checkpoints", "TESTED_TRANSFORMERS"]

log = logging.getLogger("unbroken")

#: The transformers release (major, minor) whose private checkpoint methods this adapter overrides,
#: tested by tests/integrations/test_hf_trainer.py.  Another release gets a warning, not a refusal.
TESTED_TRANSFORMERS = (5, 24)
_OVERRIDDEN = ("train", "_maybe_log_save_evaluate", "_save_checkpoint", "_load_from_checkpoint",
               "_load_optimizer_and_scheduler", "_load_rng_state")
_NOT_OPTIONS = {"self", "directory", "state", "storage_options", "mirror_options"}

TrainerT = TypeVar("TrainerT", bound=Trainer)


def resumable(trainer: TrainerT, directory: str | os.PathLike[str] | None = None, *,
              storage_options: dict[str, Any] | None = None, mirror_options: dict[str, Any] | None = None,
              **options: Any) -> TrainerT:
    """Make ``trainer`` save unbroken checkpoints and resume from them bit-exactly; returns it.

    directory: the run directory (a path or an fsspec URL); default ``<args.output_dir>/unbroken``.
    options: :class:`unbroken.CheckpointManager`'s (``every_steps``, ``keep_last``, ``async_save``,
    ``mirror_to``, ``max_runtime``, ...).  The Trainer's ``save_strategy``/``save_steps`` still ask for
    saves; the options add their own schedule, retention, stops and mirroring.

    The same object is returned, its class now a subclass of its own; ``trainer.unbroken`` is the
    :class:`Checkpoints` attached to it.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"resumable() takes a transformers.Trainer, got {type(trainer).__qualname__}")
    _check_options(options)
    _check_trainer(trainer)
    if directory is None:
        if not trainer.args.output_dir:
            raise ValueError("resumable() needs a run directory: pass resumable(trainer, 'runs/exp1') or set "
                             "TrainingArguments(output_dir=...)")
        directory = os.path.join(trainer.args.output_dir, "unbroken")
    trainer.__class__ = _resumable_class(type(trainer))  # type: ignore[assignment]  # a subclass of its own class
    setattr(trainer, "unbroken", Checkpoints(directory, storage_options, mirror_options, options))  # noqa: B010
    return trainer


def _check_options(options: Mapping[str, Any]) -> None:
    """Unknown option names fail here, not at ``train()``; values are checked when the manager opens."""
    known = [name for name in inspect.signature(unbroken.CheckpointManager.__init__).parameters
             if name not in _NOT_OPTIONS]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise TypeError(f"resumable() got an unexpected option {name!r}{hint}; it takes "
                            "unbroken.CheckpointManager's options (help(unbroken.CheckpointManager))")


def _check_trainer(trainer: Trainer) -> None:
    args = trainer.args
    refused = [
        (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False),
         "DeepSpeed and FSDP keep sharded state the adapter does not capture; use the Trainer's own checkpoints"),
        (args.world_size > 1, f"the adapter is not yet tested under torch.distributed (world size "
                              f"{args.world_size}); use the Trainer's own checkpoints there"),
        (trainer.model_init is not None, "model_init builds a new model inside train(), after the adapter "
                                         "restored the checkpoint; pass model= instead"),
        (args.load_best_model_at_end, "load_best_model_at_end reads the Trainer's checkpoint-N folders; keep "
                                      "the best checkpoints with keep_best=N, best_metric='eval_loss' instead"),
    ]
    for bad, why in refused:
        if bad:
            raise ValueError(f"resumable(): {why}")
    missing = [name for name in _OVERRIDDEN if not callable(getattr(trainer, name, None))]
    if missing:
        raise RuntimeError(f"transformers {transformers.__version__}'s Trainer has no {', '.join(missing)}: this "
                           f"adapter supports transformers {'.'.join(map(str, TESTED_TRANSFORMERS))}")
    if _version() != TESTED_TRANSFORMERS:
        warnings.warn(f"unbroken's Trainer adapter overrides private Trainer methods and was tested with "
                      f"transformers {'.'.join(map(str, TESTED_TRANSFORMERS))}.x; you have "
                      f"{transformers.__version__}: check that a resumed run matches an uninterrupted one",
                      RuntimeWarning, stacklevel=3)
    if args.ignore_data_skip:
        warnings.warn("ignore_data_skip=True: a resumed epoch restarts at its first batch, so the resumed run "
                      "trains on other batches than an uninterrupted one (not bit-exact)", UserWarning, stacklevel=3)


def _version() -> tuple[int, ...]:
    parts = transformers.__version__.split(".")[:2]
    return tuple(int(p) if p.isdigit() else -1 for p in parts)


class Checkpoints:
    """What :func:`resumable` attached to a trainer (``trainer.unbroken``).

    ``manager`` is the :class:`unbroken.CheckpointManager` of the ``train()`` call in progress (None
    outside one): ``trainer.unbroken.manager.wait()``, ``.list()``.
    """

    def __init__(self, directory: str | os.PathLike[str], storage_options: dict[str, Any] | None,
                 mirror_options: dict[str, Any] | None, options: dict[str, Any]) -> None:
        self.directory = os.fspath(directory)
        self.options = dict(options)
        self._storage_options = storage_options
        self._mirror_options = mirror_options
        self.manager: unbroken.CheckpointManager | None = None
        self._entries: dict[str, Any] = {}
        self._resume_dir: str | None = None
        self._rng: dict[str, Any] | None = None
        self._reported: int | None = None  # the last step the manager was told about
        self._saved: int | None = None  # the last step saved (or restored): never saved twice

    # -- one train() call ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, trainer: Trainer, resume: str | bool | None) -> Iterator[str | None]:
        """The manager for one ``train()`` call; yields what to pass the Trainer as resume_from_checkpoint."""
        self._entries = _entries(trainer)
        manager = unbroken.CheckpointManager(self.directory, self._entries, storage_options=self._storage_options,
                                             mirror_options=self._mirror_options, **self.options)
        self.manager, self._reported, self._saved = manager, None, None
        try:
            with manager:  # closed (final save) on success; on an exception, nothing half-done is saved
                yield self._resume(manager, resume)
        finally:
            self.manager, self._rng = None, None
            if self._resume_dir is not None:
                shutil.rmtree(self._resume_dir, ignore_errors=True)
                self._resume_dir = None

    def _resume(self, manager: unbroken.CheckpointManager, resume: str | bool | None) -> str | None:
        path: str | None = None
        if isinstance(resume, (str, os.PathLike)) and not self._is_run_directory(resume):
            if not unbroken.is_checkpoint(resume, self._storage_options):
                return os.fspath(resume)  # a Trainer checkpoint-N folder: the Trainer's own loader reads it
            path = os.fspath(resume)
        # None, False and True alike: the run directory continues where it stopped (fresh when empty).
        before = _rng_streams()
        step = manager.restore(path=path)
        progress: _Progress = self._entries["trainer"]
        if progress.loaded is None:
            return None
        # The Trainer restores the random streams later, after re-creating the epoch's iterator (which
        # draws from them): keep the restored ones until then and give back the current ones.
        self._rng = _rng_streams()
        _set_rng_streams(before)
        self._reported = self._saved = step
        self._resume_dir = tempfile.mkdtemp(prefix="unbroken-resume-")
        TrainerState(**progress.loaded["state"]).save_to_json(os.path.join(self._resume_dir, "trainer_state.json"))
        return self._resume_dir

    def _is_run_directory(self, resume: str | os.PathLike[str]) -> bool:
        given, ours = os.fspath(resume), self.directory
        if "://" in given or "://" in ours:
            return given.rstrip("/") == ours.rstrip("/")
        return os.path.abspath(given) == os.path.abspath(ours)

    def owns(self, checkpoint: Any) -> bool:
        """True for the folder this adapter handed the Trainer as its resume_from_checkpoint."""
        return self._resume_dir is not None and checkpoint == self._resume_dir

    # -- the Trainer's load points --------------------------------------------------------------------
    def hand_over(self) -> None:
        """Optimizer, scheduler and scaler exist now: load the state restored for them."""
        for name in ("optimizer", "lr_scheduler", "scaler"):
            entry = self._entries.get(name)
            if isinstance(entry, _Deferred):
                entry.hand_over()

    def finish_resume(self) -> None:
        """The Trainer's own moment to restore the random streams (after skipping the trained batches)."""
        if self._rng is not None:
            _set_rng_streams(self._rng)
            self._rng = None
        progress: _Progress = self._entries["trainer"]
        if progress.loaded is not None:
            progress.restore_accumulators()

    # -- saving -------------------------------------------------------------------------------------
    def report(self, trainer: Trainer, force: bool) -> None:
        """The step is complete (logged, evaluated): tell the manager once; ``force``: the Trainer's own
        ``save_strategy`` asks for a checkpoint of it."""
        manager = self.manager
        if manager is None:
            return
        step = trainer.state.global_step
        metrics = _metrics_at(trainer.state.log_history, step)
        if step != self._reported:
            self._reported = step
            if manager.step(step, metrics=metrics):
                self._saved = step
        if force and self._saved != step:
            self._saved = step
            try:
                manager.save(step, metrics=metrics, wait=False)
            except unbroken.CheckpointExistsError as exc:  # an earlier run's: never overwritten
                log.warning("%s", exc)


def _metrics_at(history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The numbers the Trainer logged at ``step`` (loss, eval_loss, ...): ``best_metric`` ranks by them."""
    metrics: dict[str, float] = {}
    for entry in reversed(history):
        if entry.get("step") != step:
            break
        for key, value in entry.items():
            if key != "step" and key not in metrics and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                metrics[key] = value
    return metrics


# -- what a checkpoint holds ----------------------------------------------------------------------------

def _entries(trainer: Trainer) -> dict[str, Any]:
    entries: dict[str, Any] = {
        "model": trainer.model,
        "optimizer": _Deferred(lambda: trainer.optimizer, "optimizer"),
        "lr_scheduler": _Deferred(lambda: trainer.lr_scheduler, "learning-rate scheduler"),
        "trainer": _Progress(trainer),
    }
    if getattr(trainer.accelerator, "scaler", None) is not None:  # fp16: a GradScaler
        entries["scaler"] = _Deferred(lambda: trainer.accelerator.scaler, "gradient scaler")
    return entries


class _Deferred:
    """An object the Trainer creates inside ``train()``, after the checkpoint is restored (optimizer,
    scheduler, scaler).  Saving reads the live object; restoring keeps its state until the Trainer's
    own load point (:meth:`hand_over`), after the scheduler's creation set the learning rates, exactly
    as the Trainer loads its own checkpoints."""

    def __init__(self, live: Callable[[], Any], what: str) -> None:
        self._live = live
        self._what = what
        self.loaded: Any = None

    def _object(self) -> Any:
        obj = self._live()
        if obj is None:
            raise RuntimeError(f"the Trainer has not created its {self._what} yet")
        return obj

    def state_dict(self) -> Any:
        obj = self._live()
        # Before the Trainer creates it, only the manager asks: to size its buffers at construction, and
        # for the live devices of restored tensors (none yet: the Trainer's load places them).  Saves
        # happen during training, when it exists.
        return {} if obj is None else obj.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.loaded = state

    def hand_over(self) -> None:
        if self.loaded is not None:
            self._object().load_state_dict(self.loaded)
            self.loaded = None


class _Progress:
    """The Trainer's counters: ``TrainerState`` (global_step, epoch, log_history, callbacks' states) and
    the loss accumulated since the last log, so the first log after a resume averages the same steps."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer.is_in_train:
            trainer.store_flos()  # as the Trainer's own save: total_flos counts up to this step
        state = dataclasses.asdict(trainer.state)
        state["stateful_callbacks"] = {**state["stateful_callbacks"], **_callback_states(trainer)}
        saved: dict[str, Any] = {"state": state}
        tr_loss = getattr(trainer, "_tr_loss", None)
        last_logged = getattr(trainer, "_globalstep_last_logged", None)
        if isinstance(tr_loss, torch.Tensor) and isinstance(last_logged, int):
            saved["tr_loss"] = tr_loss.item()  # float32 -> float -> float32 is exact
            saved["globalstep_last_logged"] = last_logged
        return saved

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
            raise ValueError("the checkpoint's 'trainer' entry holds no TrainerState")
        self.loaded = state

    def restore_accumulators(self) -> None:
        """Set after the Trainer zeroed them at the start of ``train()``, before the first step."""
        trainer, loaded = self._trainer, self.loaded or {}
        tr_loss = getattr(trainer, "_tr_loss", None)
        if "tr_loss" in loaded and isinstance(tr_loss, torch.Tensor):
            tr_loss.fill_(loaded["tr_loss"])
            trainer._globalstep_last_logged = loaded["globalstep_last_logged"]
        self.loaded = None


def _callback_states(trainer: Trainer) -> dict[str, Any]:
    """The states of the callbacks that export one (early stopping, TrainerControl), as the Trainer's own
    save records them, without changing ``trainer.state``."""
    by_name: dict[str, list[Any]] = {}
    for callback in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(callback, ExportableState):
            by_name.setdefault(type(callback).__name__, []).append(callback.state())
    return {name: states[0] if len(states) == 1 else states for name, states in by_name.items()}


# -- random streams (the same as the manager's capture_rng) --------------------------------------------

def _rng_streams() -> dict[str, Any]:
    streams: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                               "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        streams["cuda"] = torch.cuda.get_rng_state_all()
    return streams


def _set_rng_streams(streams: dict[str, Any]) -> None:
    random.setstate(streams["python"])
    np.random.set_state(streams["numpy"])
    torch.set_rng_state(streams["torch"])
    if "cuda" in streams:
        torch.cuda.set_rng_state_all(streams["cuda"])


# -- the Trainer subclass ----------------------------------------------------------------------------------

class _ResumableTrainer(Trainer):
    """Mixed in front of the user's Trainer class by :func:`resumable`; ``self.unbroken`` is set there."""

    unbroken: Checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        with self.unbroken.session(self, resume_from_checkpoint) as resume:
            return super().train(resume, trial, ignore_keys_for_eval, **kwargs)

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        super()._maybe_log_save_evaluate(*args, **kwargs)
        self.unbroken.report(self, force=False)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.unbroken.manager is None:  # called outside train(): the Trainer's own checkpoint
            super()._save_checkpoint(model, trial)
        else:
            self.unbroken.report(self, force=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self.unbroken.owns(resume_from_checkpoint):  # else: the model is restored already
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self.unbroken.owns(checkpoint):
            self.unbroken.hand_over()
        else:
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if not self.unbroken.owns(checkpoint):  # else: handed over with the optimizer
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self.unbroken.owns(checkpoint):
            self.unbroken.finish_resume()
        else:
            super()._load_rng_state(checkpoint)


_CLASSES: dict[type[Trainer], type[Trainer]] = {}


def _resumable_class(cls: type[Trainer]) -> type[Trainer]:
    if issubclass(cls, _ResumableTrainer):
        return cls
    made = _CLASSES.get(cls)
    if made is None:
        made = type(f"Resumable{cls.__name__}", (_ResumableTrainer, cls), {"__module__": cls.__module__})
        _CLASSES[cls] = made
    return made
