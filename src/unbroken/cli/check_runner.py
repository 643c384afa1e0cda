"""``unbroken check``'s runs: the user's command in a fresh run directory, its JSON-lines log read back.

Each run is a subprocess of the command as given, in the current directory, with the environment of
``unbroken check`` plus ``UNBROKEN_RUN_DIR``, ``UNBROKEN_CHECK_LOG`` and, for a killed run,
``UNBROKEN_KILL_AT`` (see ``unbroken.manager.check_hooks``).  ``OMP_NUM_THREADS=1`` unless asked
otherwise: a BLAS that adapts its thread count to the machine's load sums in another order from one
run to the next, and two runs on a busy machine would differ for that reason alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "Runner", "CommandFailed"]

_STDERR_TAIL = 20


class CommandFailed(Exception):
    """The command exited in a way the check cannot use (a crash, an error, no CheckpointManager)."""


@dataclass
class Run:
    """One process of the command and what its manager logged."""

    name: str
    run_dir: Path
    returncode: int
    stderr_path: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> dict[int, dict[str, Any]]:
        """Step -> the metrics passed to ``step()``, in this process."""
        return {r["step"]: r.get("metrics", {}) for r in self.records if r.get("event") == "step"}

    @property
    def step_rng(self) -> dict[int, dict[str, str]]:
        return {r["step"]: r.get("rng", {}) for r in self.records if r.get("event") == "step"}

    @property
    def saves(self) -> dict[int, dict[str, Any]]:
        return {r["step"]: r for r in self.records if r.get("event") == "save"}

    @property
    def restored(self) -> int:
        return next((int(r["step"]) for r in self.records if r.get("event") == "restore"), 0)

    @property
    def restored_rng(self) -> dict[str, str] | None:
        return next((r.get("rng") for r in self.records if r.get("event") == "restore"), None)

    @property
    def seeds(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == "seed"]

    @property
    def kill(self) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("event") == "kill"), None)

    def stderr_tail(self) -> str:
        try:
            lines = self.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_STDERR_TAIL:])


class Runner:
    """Runs ``command`` in run directories under ``workdir``."""

    def __init__(self, command: list[str], workdir: Path, steps: int | None, single_thread: bool) -> None:
        self.command, self.workdir, self.steps, self.single_thread = command, workdir, steps, single_thread

    def run(self, name: str, run_dir: Path | None = None, kill_at: int | None = None, kill_seed: int = 0) -> Run:
        """Run the command once; ``run_dir`` defaults to a new ``workdir/name``; its log is ``name.jsonl``."""
        run_dir = run_dir if run_dir is not None else self.workdir / name
        log_path, out_path, err_path = (self.workdir / f"{name}{suffix}" for suffix in (".jsonl", ".out", ".err"))
        env = dict(os.environ)
        for key in ("UNBROKEN_KILL_AT", "UNBROKEN_CHECK_STEPS", "UNBROKEN_KILL_SEED"):
            env.pop(key, None)
        env.update({"UNBROKEN_RUN_DIR": str(run_dir), "UNBROKEN_CHECK_LOG": str(log_path)})
        if self.single_thread:
            env["OMP_NUM_THREADS"] = "1"
        if self.steps is not None:
            env["UNBROKEN_CHECK_STEPS"] = str(self.steps)
        if kill_at is not None:
            env.update({"UNBROKEN_KILL_AT": str(kill_at), "UNBROKEN_KILL_SEED": str(kill_seed)})
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                code = subprocess.run(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                      check=False).returncode
        except OSError as exc:  # not found, not executable
            raise CommandFailed(f"cannot run {self.command[0]!r}: {exc.strerror or exc}") from exc
        run = Run(name, run_dir, code, err_path, _read_log(log_path))
        self._expect(run, kill_at)
        return run

    def _expect(self, run: Run, kill_at: int | None) -> None:
        if kill_at is not None and run.returncode == -signal.SIGKILL and run.kill is not None:
            return
        if kill_at is not None and run.returncode == 0:
            last = max(run.steps, default=0)
            raise CommandFailed(f"{run.name}: the command ended (exit status 0) without reporting step "
                                f"{kill_at} to its CheckpointManager (its last step: {last}); "
                                "choose --kill-at among the steps it reports")
        if run.returncode != 0:
            raise CommandFailed(f"{run.name}: the command failed with exit status {_status(run.returncode)}; "
                                f"the end of its stderr:\n{run.stderr_tail()}")
        if not run.steps:
            raise CommandFailed(f"{run.name}: the command ran, but no CheckpointManager in it reported a step "
                                "(unbroken check reaches the manager through UNBROKEN_* environment variables: "
                                "the command must create a CheckpointManager and call ckpt.step(n) in its own "
                                "process)")


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a check log; a line torn by the kill is ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
