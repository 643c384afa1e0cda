"""Every :class:`~unbroken.CheckpointManager` option, defined, documented and validated once.

Each option is one field of :class:`ManagerOptions`, declared with :func:`_option`: name, type, default,
group, documentation (``field.metadata["doc"]``, read at run time) and its check.  Everything else is
generated from these fields: the keywords, signature and help text of ``CheckpointManager.__init__``
(:func:`takes_options`), the README's option table (:func:`markdown_table`, kept equal by
tests/manager/test_options.py) and the ``unbroken prune`` flags (:func:`describe_options`, for the
options named by :data:`~.retention.RETENTION_OPTIONS`).

Static typing: ``CheckpointManager.__init__`` takes ``**options: Any``.  ``Unpack`` of a ``TypedDict``
would type each keyword, but that TypedDict would be a second definition of every name and type which
mypy cannot derive from this dataclass.  Instead the generated ``__signature__`` shows every keyword
with its type and default to ``inspect.signature``, ``help()`` and run-time completion (IPython,
Jupyter), and ``ManagerOptions.from_keywords`` refuses a misspelt name (TypeError with close matches)
and a bad value (an error naming the option) when the manager is created.

Import-light on purpose (no torch): the CLI builds its ``prune`` flags from here at start-up.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .preemption import parse_signals
from .retention import BEST_MODES, RETENTION_OPTIONS, KeepLast, RetentionPolicy, policies_from
from .schedule import SaveSchedule

__all__ = ["ManagerOptions", "GROUPS", "OptionInfo", "describe_options", "markdown_table", "options_doc",
           "takes_options"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Check = Callable[[str, Any], None]

# Group keys in the order help() and the README list them, with their headings.
GROUPS: dict[str, str] = {
    "schedule": "When to save", "retention": "Which checkpoints to keep", "saving": "Saving",
    "restore": "Restoring", "locking": "One writer per run", "stops": "Pre-emption and time limits",
    "mirror": "Second tier (mirror)", "distributed": "Under torch.distributed", "history": "Run history",
}


def _option(default: T, group: str, doc: str, *, check: Check | None = None,
            choices: tuple[str, ...] | None = None) -> T:
    """One option: its default, its group in :data:`GROUPS`, its documentation and its check.

    ``choices``: the strings it takes (help and CLI ``choices``); they are its check unless ``check`` is
    given.  Options without a check here are checked in :meth:`ManagerOptions.__post_init__` by the
    component that owns their meaning (the schedule, the retention policies).
    """
    if group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {list(GROUPS)}")
    if choices is not None and check is None:
        check = _one_of(choices)
    meta = {"doc": " ".join(doc.split()), "group": group, "check": check, "choices": choices}
    field: T = dataclasses.field(default=default, metadata=meta)
    return field


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}, got {value!r}")
    return check


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(*, positive: bool = False, optional: bool = False) -> Check:
    """A number of seconds, ``>= 0`` (``> 0`` when ``positive``); None allowed when ``optional``."""
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not _number(value) or not (value > 0 if positive else value >= 0):  # NaN fails both
            raise ValueError(f"{name} must be a number of seconds {'>' if positive else '>='} 0, got {value!r}")
    return check


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _positive_mb(name: str, value: Any) -> None:
    if value is not None and (not _number(value) or not value > 0):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")


def _url(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a URL or path string, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _by_policies(name: str, value: Any) -> None:
    """Retention options are checked together, by ``retention.policies_from`` (which prune uses too)."""


def _callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function taking one event (a dict) or None, got {value!r}")


def _signals(_name: str, value: Any) -> None:
    parse_signals(value)  # its ValueError names the bad entry and the accepted forms


@dataclass(frozen=True)
class ManagerOptions:
    """The options of one :class:`~unbroken.CheckpointManager` (``ckpt.config``), validated on creation."""

    # -- schedule (checked by SaveSchedule) -----------------------------------------------------------------
    every_steps: int | str | None = _option(None, "schedule", """``step(n)`` saves when
        ``n % every_steps == 0``.  "auto": every N steps, N tuned as training runs so that saves cost at most
        ``max_overhead`` of the training time.""")
    max_overhead: float | None = _option(None, "schedule", """With ``every_steps="auto"``: the share of
        training time that saves may cost (None: 0.01, i.e. 1%).  N is the smallest with ``save_cost / (N *
        step_time) <= max_overhead``, re-tuned at every save from smoothed measurements (``save_cost``: the time
        a save holds up ``step()``, the whole save when ``async_save=False``), between 1 and 100,000 steps.
        ``every_minutes``, ``save()``, stops and ``close()`` save whatever N is.""")
    every_minutes: float | None = _option(None, "schedule", """``step(n)`` saves when this many minutes passed
        since the last save.""")
    save_on_close: bool = _option(True, "schedule", """``close()`` saves the last step seen if it has no
        checkpoint yet (not after an exception inside ``with``).""", check=_flag)
    # -- retention (checked by retention.policies_from, which prune uses too) -------------------------------
    keep_last: int | None = _option(None, "retention", "Keep the N newest checkpoints.")
    keep_best: int | None = _option(None, "retention", """Keep the N checkpoints with the best ``best_metric``
        (a missing or NaN metric never counts as best).""")
    best_metric: str | None = _option(None, "retention", """The metric that ranks checkpoints for
        ``keep_best``: a name passed to ``step(..., metrics=)``.""")
    best_mode: str = _option("min", "retention", """Which ``best_metric`` is best: "min" (a loss) or "max"
        (an accuracy).""", choices=BEST_MODES, check=_by_policies)
    keep_every: int | None = _option(None, "retention", """Keep milestones: checkpoints whose step is a
        multiple of this.""")
    # -- saving ---------------------------------------------------------------------------------------------
    async_save: bool = _option(True, "saving", """``step()`` returns once the state is copied to host
        buffers; a background thread writes it.  False: write on the calling thread.""", check=_flag)
    when_busy: str = _option("wait", "saving", """A save due while the previous one is still being written:
        "wait" for it, or "skip" (warns).""", choices=("wait", "skip"))
    staging_budget_mb: float | None = _option(None, "saving", """Cap on the host staging memory of async saves
        (None: the state's size).  A larger state is staged in chunks, and ``step()`` returns once the last
        chunk is copied.""", check=_positive_mb)
    on_save_error: str = _option("raise", "saving", """A save that fails with an I/O error (full disk, failing
        disk, lost mount): "raise" its ``StorageError`` from ``step()``/``save()``/``wait()``/``close()``, or
        "warn" and keep training (the next scheduled save tries again).  Earlier checkpoints are intact either
        way; other errors (e.g. unserializable state) always raise.""", choices=("raise", "warn"))
    capture_rng: bool = _option(True, "saving", """Save and restore the Python, NumPy, torch CPU and CUDA
        random streams automatically.""", check=_flag)
    metadata: Any = _option(None, "saving", "JSON-able user metadata (args, config) stored in every manifest.")
    # -- restore --------------------------------------------------------------------------------------------
    strict: bool = _option(True, "restore", """``restore()`` refuses checkpoints that do not match the live
        objects; False loads what matches.""", check=_flag)
    # -- locking --------------------------------------------------------------------------------------------
    lock: bool = _option(True, "locking", """Hold an advisory lock on a local run directory while the manager
        is open, so a second job writing there fails with ``RunLockedError`` instead of racing (False:
        filesystems without locks).""", check=_flag)
    lock_timeout: float = _option(0.0, "locking", """Seconds to wait for another process's lock (a restarted
        job whose predecessor is still exiting).""", check=_seconds())
    # -- stops ----------------------------------------------------------------------------------------------
    stop_signals: tuple[str | int, ...] | None = _option(("SIGTERM", "SIGUSR1"), "stops", """Signals that mean
        "save and stop" (pre-emption, SLURM's ``--signal=USR1@120``): the next ``step()`` saves that step,
        waits for the commit and stops (see ``on_stop``).  None or (): no handlers.""", check=_signals)
    on_stop: str = _option("exit", "stops", """How ``step()`` stops after that save: "exit" raises
        ``SystemExit(75)`` (``EX_TEMPFAIL``; ``unbroken run`` and schedulers read it as "requeue me"), "raise"
        raises ``unbroken.Preempted`` to catch.""", choices=("exit", "raise"))
    max_runtime: float | None = _option(None, "stops", """Seconds this manager may run (from its creation)
        before it saves and stops, e.g. Colab's limit.""", check=_seconds(optional=True))
    deadline: float | None = _option(None, "stops", """An absolute stop time (UNIX seconds), e.g. a job's end
        time.""", check=_seconds(optional=True))
    deadline_from_slurm: bool = _option(True, "stops", """Inside a SLURM job, also stop before the job's end
        time (``SLURM_JOB_END_TIME`` or ``squeue``).""", check=_flag)
    deadline_margin: float = _option(30.0, "stops", """Seconds of safety before a deadline, on top of the
        longest recent step plus the longest recent save.""", check=_seconds())
    # -- mirror ---------------------------------------------------------------------------------------------
    mirror_to: str | None = _option(None, "mirror", """A second tier (``s3://bucket/run``, another path): every
        committed checkpoint is copied there in the background; ``restore()`` downloads from it when it has a
        newer one (a new machine).  Upload failures are logged and retried, never raised: the local
        checkpoint is always complete.""", check=_url)
    mirror_keep_last: int | None = _option(None, "mirror", """Retention on the mirror: keep its N newest
        (None: keep everything uploaded).  Needs ``mirror_to``.""", check=_positive_int)
    # -- distributed ----------------------------------------------------------------------------------------
    restore_mode: str = _option("auto", "distributed", """"direct": each rank reads the byte ranges it
        needs (every rank of a DDP job opens every rank's file: about N² requests at N ranks); "spread": the
        ranges every rank needs (replicated tensors) are read once, each file by one rank, and broadcast, each
        rank reading its own pieces itself (about N requests); "broadcast": rank 0 reads everything and
        broadcasts it (node-local disks); "auto": direct up to 8 ranks, spread above.""",
        choices=("auto", "direct", "spread", "broadcast"))
    dist_timeout: float = _option(600.0, "distributed", """Seconds a rank waits for the others in a collective
        step of a save or a restore; past it (a rank died or hangs) every rank raises instead of waiting
        forever.""", check=_seconds(positive=True))
    # -- history --------------------------------------------------------------------------------------------
    events: bool = _option(True, "history", """Append what happens to the run (start, restores, saves with their
        stall and time to commit, retention, quarantines, stops, sampled ``step()`` metrics, close) to its event
        log, ``events.jsonl`` in the run directory (docs/EVENTS.md), read by ``unbroken report``.  Never fails
        or slows training: a log that cannot be written is warned about once.""", check=_flag)
    on_event: Callable[[dict[str, Any]], None] | None = _option(None, "history", """A function called with
        each event (the same dicts as the log, also with ``events=False``), e.g. to send ``save`` events to
        TensorBoard or W&B; possibly from the background save thread.  An exception in it is warned about
        once and never stops training.  ``ckpt.stats`` holds the last save's figures.""", check=_callable)

    def __post_init__(self) -> None:
        self.schedule()  # SaveSchedule checks every_steps / every_minutes / max_overhead
        self.policies()  # retention.policies_from checks the retention options
        for field in dataclasses.fields(self):
            check = field.metadata["check"]
            if check is not None:
                check(field.name, getattr(self, field.name))
        if self.mirror_keep_last is not None and self.mirror_to is None:
            raise ValueError("mirror_keep_last is set but mirror_to is not; set mirror_to='s3://bucket/run'")

    @classmethod
    def from_keywords(cls, options: Mapping[str, Any]) -> ManagerOptions:
        """``ManagerOptions(**options)``, refusing an unknown name with a TypeError that suggests close ones."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in names]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise TypeError(f"CheckpointManager() got {'an ' if not plural else ''}unexpected keyword argument{plural} "
                            + ", ".join(_with_close_matches(name, names) for name in unknown)
                            + "; help(unbroken.CheckpointManager) lists every option")
        return cls(**options)

    @property
    def staging_budget_bytes(self) -> int | None:
        return None if self.staging_budget_mb is None else max(2, int(self.staging_budget_mb * 1024 * 1024))

    def schedule(self) -> SaveSchedule:
        return SaveSchedule(self.every_steps, self.every_minutes, max_overhead=self.max_overhead)

    def policies(self) -> list[RetentionPolicy]:
        return policies_from(**{name: getattr(self, name) for name in RETENTION_OPTIONS})

    def mirror_policies(self) -> list[RetentionPolicy]:
        return [KeepLast(self.mirror_keep_last)] if self.mirror_keep_last is not None else []


def _with_close_matches(name: str, names: list[str]) -> str:
    close = [repr(match) for match in difflib.get_close_matches(name, names, n=3)]
    if not close:
        return repr(name)
    return f"{name!r} (did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}?)"


# -- descriptions generated from the fields -----------------------------------------------------------------

@dataclass(frozen=True)
class OptionInfo:
    """One option as the signature, help(), the README and the CLI show it."""

    name: str
    annotation: Any  # the resolved type, e.g. ``int | None``
    default: Any
    group: str
    doc: str  # reStructuredText-ish: ``code`` in double backticks
    choices: tuple[str, ...] | None

    @property
    def value_type(self) -> Any:
        """The type of a value that is not None (``int`` for ``int | None``)."""
        args = [a for a in typing.get_args(self.annotation) if a is not type(None)]
        if isinstance(self.annotation, types.UnionType) and len(args) == 1:
            return args[0]
        return self.annotation

    @property
    def plain_doc(self) -> str:
        """The doc without markup (command-line help)."""
        return self.doc.replace("``", "")


def describe_options() -> list[OptionInfo]:
    """Every option in definition order (grouped by :data:`GROUPS`)."""
    hints = typing.get_type_hints(ManagerOptions)
    infos = [OptionInfo(f.name, hints[f.name], f.default, f.metadata["group"], f.metadata["doc"],
                        f.metadata["choices"]) for f in dataclasses.fields(ManagerOptions)]
    return sorted(infos, key=lambda info: list(GROUPS).index(info.group))


def options_doc() -> str:
    """The options part of ``help(CheckpointManager)``: each option, grouped, with default and meaning."""
    lines = ["Options (keyword-only; ``ckpt.config.<name>`` reads them back):"]
    infos = describe_options()
    for key, heading in GROUPS.items():
        lines += ["", f"{heading}:"]
        for info in infos:
            if info.group == key:
                lines.append(f"    {info.name}={info.default!r}")
                lines += textwrap.wrap(info.doc, 100, initial_indent=" " * 8, subsequent_indent=" " * 8,
                                       break_on_hyphens=False)
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's option table (tests/manager/test_options.py keeps the README equal to it)."""
    rows = ["| Option | Default | Meaning |", "|---|---|---|"]
    infos = describe_options()
    for key, heading in GROUPS.items():
        rows.append(f"| **{heading}** | | |")
        for info in infos:
            if info.group == key:
                meaning = re.sub(r"``(.+?)``", r"`\1`", info.doc).replace("|", "\\|")
                rows.append(f"| `{info.name}` | `{info.default!r}` | {meaning} |")
    return "\n".join(rows)


def takes_options(init: F) -> F:
    """Give ``init`` (which takes ``**options``) every option as a keyword in its ``__signature__``, and the
    grouped option documentation after its own docstring, for ``inspect.signature`` and ``help()``."""
    own = inspect.signature(init, eval_str=True)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(info.name, inspect.Parameter.KEYWORD_ONLY, default=info.default,
                                 annotation=info.annotation) for info in describe_options()]
    init.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    init.__doc__ = inspect.cleandoc(init.__doc__ or "") + "\n\n" + options_doc()
    return init
