"""The manager's settings, documented and validated in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .preemption import parse_signals
from .retention import KeepBest, KeepEvery, KeepLast, RetentionPolicy
from .schedule import SaveSchedule

__all__ = ["ManagerConfig"]


@dataclass(frozen=True)
class ManagerConfig:
    every_steps: int | None = None
    """``step(n)`` saves when ``n % every_steps == 0``."""
    every_minutes: float | None = None
    """``step(n)`` saves when this many minutes passed since the last save."""
    keep_last: int | None = None
    """Keep the N newest checkpoints (None: no limit from this policy)."""
    keep_best: int | None = None
    """Keep the N checkpoints with the best ``best_metric``."""
    best_metric: str | None = None
    """Name of the metric (passed to ``step(..., metrics=)``) that ranks checkpoints for ``keep_best``."""
    best_mode: str = "min"
    """"min" (a loss) or "max" (an accuracy)."""
    keep_every: int | None = None
    """Keep milestones: checkpoints whose step is a multiple of this."""
    save_on_close: bool = True
    """``close()`` saves the last step seen if it has no checkpoint yet (not after an exception)."""
    strict: bool = True
    """``restore()`` refuses checkpoints that do not match the live objects; False loads what matches."""
    capture_rng: bool = True
    """Save and restore Python, NumPy, torch CPU and CUDA random streams automatically."""
    metadata: Any = None
    """JSON-able user metadata (args, config) stored in every manifest."""
    async_save: bool = True
    """``step()`` returns once the state is copied to host buffers; a background thread writes it."""
    when_busy: str = "wait"
    """A save due while the previous one is still being written: "wait" for it, or "skip" (warns)."""
    staging_budget_mb: float | None = None
    """Cap on the host staging memory of async saves (None: the state's size). A larger state is
    staged in chunks, and ``step()`` returns once the last chunk is copied."""
    on_save_error: str = "raise"
    """A save that fails with an I/O error (full disk, failing disk, lost mount): "raise" its
    ``StorageError`` from ``step()``/``save()``/``wait()``/``close()``, or "warn" and keep training (the
    next scheduled save tries again).  Earlier checkpoints are intact either way; other errors
    (e.g. unserializable state) always raise."""

    lock: bool = True
    """Hold an advisory lock on a local run directory while the manager is open, so a second job
    writing there fails with ``RunLockedError`` instead of racing (False: filesystems without locks)."""
    lock_timeout: float = 0.0
    """Seconds to wait for another process's lock (a restarted job whose predecessor is still exiting)."""

    stop_signals: tuple[str | int, ...] | None = ("SIGTERM", "SIGUSR1")
    """Signals that mean "save and stop" (pre-emption, SLURM's ``--signal=USR1@120``): the next ``step()``
    saves that step, waits for the commit and stops (see ``on_stop``).  None or (): no handlers."""
    on_stop: str = "exit"
    """How ``step()`` stops after that save: "exit" raises ``SystemExit(75)`` (``EX_TEMPFAIL``; ``unbroken
    run`` and schedulers read it as "requeue me"), "raise" raises ``unbroken.Preempted`` to catch."""
    max_runtime: float | None = None
    """Seconds this manager may run (from its creation) before it saves and stops, e.g. Colab's limit."""
    deadline: float | None = None
    """An absolute stop time (UNIX seconds), e.g. a job's end time."""
    deadline_from_slurm: bool = True
    """Inside a SLURM job, also stop before the job's end time (``SLURM_JOB_END_TIME`` or ``squeue``)."""
    deadline_margin: float = 30.0
    """Seconds of safety on top of the longest recent step plus the longest recent save."""

    mirror_to: str | None = None
    """A second tier (``s3://bucket/run``, another path): every committed checkpoint is copied there in
    the background; ``restore()`` downloads from it when it has a newer one (a new machine).  Upload
    failures are logged and retried, never raised: the local checkpoint is always complete."""
    mirror_keep_last: int | None = None
    """Retention on the mirror: keep its N newest (None: keep everything uploaded)."""

    restore_mode: str = "direct"
    """Under torch.distributed: "direct" (each rank reads the byte ranges it needs) or "broadcast" (rank 0
    reads them and broadcasts them: node-local disks, or many ranks reading the same bytes)."""
    dist_timeout: float = 600.0
    """Under torch.distributed: seconds a rank waits for the others in a collective step of a save or a
    restore; past it (a rank died or hangs) every rank raises instead of waiting forever."""

    def __post_init__(self) -> None:
        self.schedule()  # validates every_steps / every_minutes
        self.policies()  # validates the retention settings
        if self.best_metric is not None and self.keep_best is None:
            raise ValueError(f"best_metric={self.best_metric!r} is set but keep_best is not; set keep_best=N")
        if self.when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy must be 'wait' or 'skip', got {self.when_busy!r}")
        if self.on_save_error not in ("raise", "warn"):
            raise ValueError(f"on_save_error must be 'raise' or 'warn', got {self.on_save_error!r}")
        budget = self.staging_budget_mb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise ValueError(f"staging_budget_mb must be a positive number or None, got {budget!r}")
        timeout = self.lock_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"lock_timeout must be a number of seconds >= 0, got {timeout!r}")
        if self.on_stop not in ("exit", "raise"):
            raise ValueError(f"on_stop must be 'exit' or 'raise', got {self.on_stop!r}")
        for name in ("max_runtime", "deadline", "deadline_margin"):
            value = getattr(self, name)
            if value is None and name != "deadline_margin":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        parse_signals(self.stop_signals)  # names a bad signal
        if self.restore_mode not in ("direct", "broadcast"):
            raise ValueError(f"restore_mode must be 'direct' or 'broadcast', got {self.restore_mode!r}")
        timeout = self.dist_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"dist_timeout must be a number of seconds > 0, got {timeout!r}")
        if self.mirror_to is not None and (not isinstance(self.mirror_to, str) or not self.mirror_to):
            raise ValueError(f"mirror_to must be a URL or path string, got {self.mirror_to!r}")
        if self.mirror_keep_last is not None and self.mirror_to is None:
            raise ValueError("mirror_keep_last is set but mirror_to is not; set mirror_to='s3://bucket/run'")
        self.mirror_policies()
        for name in ("save_on_close", "strict", "capture_rng", "async_save", "lock", "deadline_from_slurm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def staging_budget_bytes(self) -> int | None:
        return None if self.staging_budget_mb is None else max(2, int(self.staging_budget_mb * 1024 * 1024))

    def schedule(self) -> SaveSchedule:
        return SaveSchedule(self.every_steps, self.every_minutes)

    def mirror_policies(self) -> list[RetentionPolicy]:
        return [KeepLast(self.mirror_keep_last)] if self.mirror_keep_last is not None else []

    def policies(self) -> list[RetentionPolicy]:
        policies: list[RetentionPolicy] = []
        if self.keep_last is not None:
            policies.append(KeepLast(self.keep_last))
        if self.keep_best is not None:
            policies.append(KeepBest(self.keep_best, self.best_metric or "", self.best_mode))
        if self.keep_every is not None:
            policies.append(KeepEvery(self.keep_every))
        return policies
