"""CheckpointManager: when to save, which checkpoints to keep, and resuming from the newest valid one."""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, MutableMapping
from functools import partial
from types import TracebackType
from typing import Any

from .._internal.gcpause import paused_gc
from .._internal.warn import warn
from ..checkpoint.listing import CheckpointRecord, record_of, scan
from ..checkpoint.newest import restore_newest, restore_step
from ..checkpoint.single import build_manifest, load_checkpoint
from ..data import make_resumable, needs_adoption
from ..errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    RunDirectoryReplacedError,
    StorageError,
    UnbrokenError,
)
from ..format import Manifest
from ..state import capture, check_state_keys
from ..storage import LocalStorage, Storage, open_storage, step_name
from ..storage.paths import split_checkpoint_path
from .check_hooks import CheckHooks, run_directory
from .events import EventLog, SaveStats
from .mirror import Mirror
from .options import ManagerOptions, takes_options
from .pending_grads import GradientCheck
from .preemption import EXIT_PREEMPTED, Preempted, Stops, earliest_limit, parse_signals, write_stop_marker
from .quarantine import quarantine, repair_from
from .ranks import DistributedRun, attach
from .retention import expired
from .run_directory import open_run_directory
from .runlock import RunLock
from .save_runner import SaveRunner

__all__ = ["CheckpointManager"]

log = logging.getLogger("unbroken")


class CheckpointManager:
    """Captures the whole training state, saves it crash-safely, keeps the right checkpoints, resumes.

    ``state`` maps names to objects with ``state_dict()``/``load_state_dict()`` (models, optimizers,
    schedulers, scalers, EMA models, samplers, ...) or to plain JSON-able values (epoch, args).  The
    dict is read at every save; :meth:`restore` loads objects in place and replaces plain values in it.
    Every option is a keyword of :meth:`__init__`, listed there with its meaning; they are defined once,
    in :class:`~unbroken.manager.options.ManagerOptions`.
    """

    @takes_options
    def __init__(self, directory: str | os.PathLike[str], state: MutableMapping[str, Any], *,
                 storage_options: dict[str, Any] | None = None, mirror_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        """Open (or create) the run directory and manage the checkpoints of ``state``.

        directory: a local path or an fsspec URL (``s3://bucket/run``).
            ``UNBROKEN_RUN_DIR`` in the environment replaces it (``unbroken check``; with
            ``UNBROKEN_KILL_AT``, ``UNBROKEN_CHECK_LOG``, ``UNBROKEN_CHECK_STEPS``: see
            :mod:`unbroken.manager.check_hooks`).
        state: names -> objects with ``state_dict()``/``load_state_dict()``, or plain JSON-able values.
        storage_options: fsspec options (credentials, endpoint) for a URL ``directory``; never stored.
        mirror_options: the same for ``mirror_to``.

        An unknown option raises TypeError naming it and the close matches; a bad value raises an error
        naming the option.
        """
        self.config = ManagerOptions.from_keywords(options)
        for value in state.values():
            if needs_adoption(value):
                make_resumable(value)  # in place: the caller's loader object now resumes exactly
        check_state_keys(state)
        self.state = state
        # storage_options (credentials, endpoints) go to fsspec only: never into the config, a log or a checkpoint.
        self.storage: Storage = open_run_directory(run_directory(directory), storage_options)
        self._mirror: Mirror | None = None
        self._retention_lock = threading.Lock()
        # Under torch.distributed (world size > 1) every rank saves its part of one checkpoint and rank 0
        # commits it; unbroken/distributed/ holds the protocol.  Collective: every rank builds its manager.
        self._dist: DistributedRun | None = attach(self.storage, self.config.restore_mode, self.config.dist_timeout,
                                                   self.config.mirror_to, mirror_options)
        self._schedule = self.config.schedule() if self._dist is None else self._dist.schedule(self.config.schedule())
        self._policies = self.config.policies()
        if self._dist is None:
            self._saver = SaveRunner(self.storage, self.config.async_save, self.config.when_busy,
                                self.config.staging_budget_bytes, on_commit=self._after_commit)
        else:
            self._saver = self._dist.saver(self.storage, self.config.async_save, self.config.staging_budget_bytes,
                                           self._after_commit, self.state)
        if self._dist is None:  # a rank writes only its part: its plan is known at its first save
            self._saver.prepare_for(self.state, self.config.capture_rng)  # background: the first save's buffers
        self._last_step: int | None = None
        self._last_metrics: dict[str, Any] = {}
        self._gradients = GradientCheck(self.state)
        self._check = CheckHooks.from_environment()  # unbroken check: UNBROKEN_KILL_AT, UNBROKEN_CHECK_LOG
        self._saved_steps: set[int] = set()
        self._last_committed: Manifest | None = None
        # The newest checkpoint known good in this process (restored from this run, or committed by this
        # manager): retention never deletes it, whatever it counts on disk, until a newer one is known good.
        self._verified_step: int | None = None
        self._closed = False
        self._closed_reason = ""
        self._save_reason = "explicit"  # the reason of save()'s saves in the event log ("close" from close())
        self._lock: RunLock | None = None
        if self.config.lock and isinstance(self.storage, LocalStorage) and (self._dist is None or
                                                                              self._dist.owns_directory):
            self._lock = RunLock(self.storage.root, on_takeover=self._taken_over)
            self._lock.acquire(self.config.lock_timeout)
            weakref.finalize(self, self._lock.release)  # a manager dropped without close() frees the run
        cfg = self.config
        deadline, kind = earliest_limit(cfg.max_runtime, cfg.deadline, cfg.deadline_from_slurm)
        self._stops = Stops(parse_signals(cfg.stop_signals), margin=cfg.deadline_margin, deadline=deadline,
                            deadline_kind=kind)
        weakref.finalize(self, self._stops.uninstall)
        # Under torch.distributed, from a shared directory the coordinator alone uploads; from node-local
        # directories every rank uploads its own file and rank 0 commits (rank_mirror.py).
        if self._dist is not None and self._dist.node is not None:
            self._mirror = self._dist.mirror(self.storage, self.config.mirror_policies(),
                                             _weak_call(self._apply_retention))
        elif self.config.mirror_to is not None and (self._dist is None or self._dist.is_coordinator):
            remote = open_storage(self.config.mirror_to, mirror_options, create=True)
            # Local retention skips the checkpoint being uploaded; it runs again once that upload is done.
            self._mirror = Mirror(self.storage, remote, self.config.mirror_policies(),
                                  on_uploaded=_weak_call(self._apply_retention))
        world = self._dist.world if self._dist is not None else None
        self._events = EventLog.for_manager(self.storage, writes=world is None or world.is_coordinator,
                                            enabled=cfg.events, on_event=cfg.on_event, rank=world.rank if world else 0,
                                            world_size=world.size if world else 1, clock=self._schedule.clock)

    # -- resuming ---------------------------------------------------------------------------------
    def restore(self, step: int | None = None, path: str | os.PathLike[str] | None = None,
                strict: bool | None = None) -> int:
        """Restore a checkpoint into the live objects; the step to continue from (0 when none exists).

        With no arguments: the newest checkpoint that validates, skipping broken ones with a
        warning.  ``step=N`` or ``path=DIR`` restore exactly that checkpoint or raise.
        """
        strict = self.config.strict if strict is None else strict
        started = self._schedule.clock()
        if self._dist is not None:  # every rank restores the same checkpoint, or none does
            if self._mirror is not None:  # rank 0: it lists the run for every rank after this download
                self._mirror.fetch(step)
            restored = self._dist.restore(self.storage, self.state, strict, self.config.capture_rng, step=step,
                                          path=path, on_corrupt=partial(quarantine, self.storage, events=self._events))
            return self._resumed(restored, from_this_run=path is None, started=started)
        removed = self.storage.cleanup()
        if removed:
            log.info("removed abandoned staging/trash areas: %s", ", ".join(removed))
        if path is not None:
            storage, name = split_checkpoint_path(path, storage_options=None)
            manifest: Manifest | None = load_checkpoint(storage, name, self.state, strict, self.config.capture_rng)
        elif step is not None:
            if self._mirror is not None:
                self._mirror.fetch(step)
            manifest = restore_step(self.storage, step, self.state, strict, self.config.capture_rng)
        else:
            if self._mirror is not None:  # a new machine: the newest checkpoint may only be in the bucket
                self._mirror.fetch()
            manifest = restore_newest(self.storage, self.state, strict, self.config.capture_rng,
                                      on_corrupt=self._set_aside, on_skip=self._events.skipped)
        return self._resumed(manifest, from_this_run=path is None, started=started)

    def _set_aside(self, name: str, problem: CorruptCheckpointError) -> bool:
        """Quarantine a checkpoint found corrupt while resuming; True when the mirror put a good copy in
        its place (restore tries it again), else restore falls back to the previous checkpoint."""
        moved = quarantine(self.storage, name, problem, events=self._events)
        return moved is not None and repair_from(self._mirror, name)

    def _resumed(self, manifest: Manifest | None, from_this_run: bool, started: float) -> int:
        """Account for a restore that began at ``started`` (on the schedule's clock) and log it, with
        the size of the checkpoint and the time it took: a long restore is otherwise silent."""
        self._events.restored(manifest, self._schedule.clock() - started, from_this_run)
        if self._check is not None:
            self._check.restored(manifest.step if manifest is not None else 0)
        if manifest is None:
            log.info("no checkpoint in %s: starting from step 0", self.storage.url)
            return 0
        if from_this_run:  # read and verified in full: known good, so retention keeps it
            self._verified_step = manifest.step
        if self._dist is None:  # restored tensors may differ in size from those at construction
            self._saver.prepare_for(self.state, self.config.capture_rng)
        self._last_step = manifest.step
        self._saved_steps.add(manifest.step)
        self._schedule.saved(manifest.step)
        # A run killed between a commit and its retention pass left one checkpoint too many.
        self._apply_retention()
        log.info("resumed from step %d (%s): a checkpoint of %d bytes, restored in %.1f s", manifest.step,
                 self.storage.url, manifest.total_bytes, self._schedule.clock() - started)
        return manifest.step

    # -- saving -----------------------------------------------------------------------------------
    def step(self, step: int, metrics: dict[str, Any] | None = None) -> bool:
        """Report that ``step`` steps are complete; saves when the schedule says so.  True if a save
        was started (with ``async_save`` it is still being written when this returns)."""
        if self._check is None:
            return self._step(step, metrics)
        self._check.before_step(step)
        started = self._step(step, metrics)
        if self._check.after_step(step, self._last_metrics, lambda: bool(getattr(self._saver, "busy", False))):
            self.close()  # UNBROKEN_CHECK_STEPS: the run ends here, with this step saved
            raise SystemExit(0)
        return started

    def _step(self, step: int, metrics: dict[str, Any] | None) -> bool:
        self._check_open()
        self._surface_errors(block=False)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"step went backwards: {step} after {self._last_step}; pass the number of "
                             "completed steps, which only grows")
        self._last_step = step
        self._last_metrics = dict(metrics or {})
        self._events.metrics(step, self._last_metrics)
        self._stops.step_done()
        reason = self._stops.reason()
        if reason is not None:
            self._stop(step, reason)
        if step in self._saved_steps or not self._schedule.due(step):
            return False
        try:
            taken = self.storage.exists(step_name(step))
        except StorageError as exc:  # the store is unreachable: this save fails like any other I/O failure
            self._save_failed(step, exc)
            return False
        if taken:
            # Left by an earlier run (e.g. after restore(step=older)): committed checkpoints are never
            # overwritten, and stopping the training for it would be worse than skipping this save.
            message = (f"a checkpoint for step {step} already exists in {self.storage.url}; not overwritten "
                       "(delete it or use a new run directory to keep this run's state)")
            warn(message, RuntimeWarning)
            self._saved_steps.add(step)
            return False
        return self._start_save(step, self._last_metrics, "schedule")

    def save(self, step: int | None = None, metrics: dict[str, Any] | None = None,
             wait: bool = True) -> CheckpointRecord | None:
        """Save now (at ``step``, default the last step reported) and, with ``wait``, until committed.

        Raises if that step is already saved.  Returns the committed record, or None when not waiting
        or when skipped because a save is in flight (``when_busy="skip"``).
        """
        self._check_open()
        self._surface_errors(block=False)
        step = self._last_step if step is None else step
        if step is None:
            raise ValueError("save() needs a step: pass save(step=N) or call step(N) first")
        if self.storage.exists(step_name(step)):
            raise CheckpointExistsError(f"a checkpoint for step {step} already exists in {self.storage.url}; "
                                        "committed checkpoints are never overwritten")
        if not self._start_save(step, dict(metrics) if metrics is not None else self._last_metrics,
                                self._save_reason) or not wait:
            return None
        self._surface_errors(block=True)
        committed = self._last_committed
        return record_of(self.storage, step_name(step), committed) if committed and committed.step == step else None

    def _stop(self, step: int, reason: str) -> None:
        """Save ``step`` (unless saved), wait for the commit, close, and leave the training loop."""
        log.warning("stopping at step %d (%s): saving a checkpoint first", step, reason)
        self._events.stopped(step, *self._stops.cause())
        self._surface_errors(block=True)  # the save in flight (an older step) commits first
        if step not in self._saved_steps and not self.storage.exists(step_name(step)):
            self._start_save(step, self._last_metrics, "stop")
            self._surface_errors(block=True)
        self.close()
        if isinstance(self.storage, LocalStorage):
            write_stop_marker(self.storage.root, step, reason)
        message = f"unbroken: stopped at step {step} ({reason}); checkpoint committed in {self.storage.url}"
        print(message, file=sys.stderr, flush=True)  # noqa: T201 (the stop is reported on stderr even without logging set up)
        if self.config.on_stop == "raise":
            raise Preempted(step, reason)
        raise SystemExit(EXIT_PREEMPTED)

    def _start_save(self, step: int, metrics: dict[str, Any], reason: str) -> bool:
        """Snapshot and start writing; False if skipped (``when_busy="skip"``).  A synchronous save
        is complete, and its error raised, when this returns."""
        if self._saver.skips(step):
            return False
        started = self._schedule.clock()  # the save's cost to training: from here to the return
        # The previous save's failure is that save's: raised or warned about here, by on_save_error.
        self._surface_errors(block=True)
        self._stops.save_started()
        self._events.save_started(step, reason, self.config.async_save)
        pending = self._gradients.at_save(step)  # a save between gradient-accumulation micro-steps: warned once
        if self._check is not None:
            self._check.saving(step, pending)
        with paused_gc():
            snap = capture(self.state, rng=self.config.capture_rng)
            manifest = build_manifest(snap, step, metrics, self.config.metadata)
        self._saver.save(step_name(step), step, snap, manifest)
        self._saved_steps.add(step)
        self._schedule.saved(step)
        if not self.config.async_save:
            self._surface_errors(block=True)
        stall = self._schedule.clock() - started
        self._schedule.save_cost(stall)
        self._events.save_stalled(step, stall)
        return True

    def wait(self) -> None:
        """Block until the save in flight is committed; raises its error if it failed."""
        self._surface_errors(block=True)

    def _surface_errors(self, block: bool) -> Manifest | None:
        """Raise the error of a failed background save here, on the training thread, exactly once."""
        step = self._saver.pending_step
        try:
            if block:
                return self._saver.wait()
            self._saver.raise_if_failed()
            return None
        except BaseException as exc:
            self._saved_steps.discard(step)  # never counted as saved: close() or a later save retries
            self._save_failed(step, exc)
            return None

    def _save_failed(self, step: int | None, exc: BaseException) -> None:
        """Raise a failed save's error, or with ``on_save_error="warn"`` turn an I/O failure into a warning.

        Only I/O failures are downgraded: the next scheduled save tries again, and the earlier
        checkpoints are intact.  A bug (unserializable state) must still stop the run, and so must a
        run directory deleted or replaced under us: no later save can succeed, and the path may now
        be another job's."""
        self._events.save_failed(step, exc)
        if isinstance(exc, RunDirectoryReplacedError) or not (
                isinstance(exc, StorageError) and self.config.on_save_error == "warn"):
            raise exc
        message = f"checkpoint for step {step} failed, training continues: {exc}"
        warn(message, RuntimeWarning)

    def _after_commit(self, manifest: Manifest) -> None:
        """Runs on the writer once a save is committed.  A commit is a commit: nothing here may turn
        it into a failed save, so a failed retention pass is a warning of its own, retried after the
        next commit."""
        self._last_committed = manifest
        self._verified_step = max(manifest.step, self._verified_step or 0)
        self._stops.save_committed()
        self._events.save_committed(manifest.step, manifest.total_bytes)
        log.info("saved checkpoint step %d (%d bytes) to %s", manifest.step, manifest.total_bytes,
                 self.storage.url)
        try:
            self._apply_retention()
        except Exception as exc:  # any failure here is reported, never charged to the save
            message = (f"retention after the commit of step {manifest.step} failed (the checkpoint is committed; "
                       f"retention runs again after the next save): {type(exc).__name__}: {exc}")
            warn(message, RuntimeWarning)
        if self._mirror is not None:
            self._mirror.submit(step_name(manifest.step))

    def _apply_retention(self) -> None:
        if not self._policies or (self._dist is not None and not self._dist.owns_directory):
            return
        with self._retention_lock:  # the writer thread and the mirror's uploader both call this
            self._retain()

    def _retain(self) -> None:
        uploading = self._mirror.busy if self._mirror is not None else None
        removed: list[str] = []
        for record in expired(scan(self.storage), self._policies):
            if step_name(record.step) == uploading or record.step == self._verified_step:
                continue
            try:
                self.storage.delete(step_name(record.step))
                removed.append(step_name(record.step))
                log.info("retention: deleted checkpoint step %d", record.step)
            except RunDirectoryReplacedError:
                raise  # not ours to delete from any more: one error, not a warning per checkpoint
            except OSError as exc:  # a failed delete costs disk space, never the run
                message = f"retention: could not delete checkpoint step {record.step}: {exc}"
                warn(message, RuntimeWarning)
        self._events.removed(removed)

    # -- listing and lifetime -----------------------------------------------------------------------
    def list(self, verify: bool = False) -> list[CheckpointRecord]:
        """Every checkpoint of the run directory, oldest first, with ``valid`` and ``problem`` set."""
        return scan(self.storage, verify=verify)

    @property
    def stats(self) -> SaveStats:
        """The last committed save's figures (step, bytes, stall_s, commit_s, throughput_bps) and this
        manager's totals (saves, failed_saves, total_stall_s): ``wandb.log(ckpt.stats.scalars())``."""
        return self._events.stats

    def close(self) -> None:
        """Save the final step if configured and not yet saved, and wait for pending saves."""
        if self._closed:
            return
        try:
            self._surface_errors(block=True)
            last = self._last_step
            if self.config.save_on_close and last is not None and last not in self._saved_steps:
                if self._verified_step == last or self.storage.exists(step_name(last)):
                    # Committed already (a save reported failed after its commit, or an earlier run's):
                    # committed checkpoints are never overwritten, and there is nothing left to save.
                    log.info("close: step %d is already saved in %s", last, self.storage.url)
                else:
                    self._save_reason = "close"
                    self.save(last, self._last_metrics, wait=True)
        finally:
            self._closed = True
            try:
                self._saver.close()
            finally:
                self._release_lock()

    def _release_lock(self, error: BaseException | None = None) -> None:
        """Give back what the manager holds outside itself: the mirror (after its last upload), signal
        handlers, the collective, the event log (its last event: close, with ``error``), the lock."""
        if self._mirror is not None:
            self._mirror.close(wait=True)
            if self._mirror.last_error is not None:
                log.warning("mirror: the last upload to %s failed (%s); the local checkpoints are complete",
                            self._mirror.remote.url, self._mirror.last_error)
        self._stops.release()
        self._events.close(self._last_step, error)
        if self._lock is not None:
            self._lock.release()

    def _taken_over(self) -> None:
        """A newer manager in this process opened our run directory: stop writing, keep nothing open."""
        self._closed, self._closed_reason = True, ": a newer CheckpointManager took over its run directory"
        self._stops.uninstall()
        try:
            self._saver.close()  # the save in flight completes a finished step: let it commit
        except (OSError, UnbrokenError) as error:  # that save's error belongs to the replaced manager's user
            log.warning("the replaced manager's last save failed: %s", error)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this CheckpointManager is closed{self._closed_reason}")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # state may be half-updated mid-step: never save it as if it were a completed step
            self._closed = True
            try:
                self._saver.close()  # a save in flight holds a completed step: let it commit
            except (OSError, UnbrokenError) as error:  # the exception already propagating matters more
                log.warning("a background save failed while handling another error: %s", error)
            finally:
                self._release_lock(exc)


def _weak_call(method: Callable[[], None]) -> Callable[[str], None]:
    """A callback to ``method`` that does not keep its object alive (the mirror thread would)."""
    ref = weakref.WeakMethod(method)

    def call(_name: str) -> None:
        target = ref()
        if target is not None:
            target()

    return call
