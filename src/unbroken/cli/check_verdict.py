"""``unbroken check``'s verdicts: where two runs first differ (metrics step by step, final checkpoints
tensor by tensor through :func:`unbroken.diff`) and the hints that match what was seen."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from unbroken.cli.check_runner import Run
from unbroken.interchange.diff_result import CheckpointDiff, EntryDiff
from unbroken.state import RNG_KEY

__all__ = ["Verdict", "unused_streams", "without_streams", "compare_repeat", "compare_resume",
           "first_metric_difference", "first_state_difference", "NONDETERMINISM_CAUSES"]

NONDETERMINISM_CAUSES = (
    "CPU BLAS threading that adapts to load (MKL's dynamic threads; unbroken check sets OMP_NUM_THREADS=1 "
    "unless --keep-threads)",
    "torch.backends.cudnn.benchmark = True (it picks kernels by timing)",
    "nondeterministic CUDA kernels (scatter/index_add atomics, some convolutions): "
    "torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8",
    "unseeded generators (torch.Generator() without manual_seed, numpy.random.default_rng() without a seed, "
    "random.Random())",
    "data-dependent timing or the environment in the computation (time.time(), os.urandom, the order of a "
    "set of strings, DataLoader workers returning batches in arrival order)",
)


@dataclass
class Verdict:
    identical: bool
    findings: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)


def first_metric_difference(reference: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]],
                            steps: list[int]) -> str | None:
    """The first of ``steps`` whose metrics differ, described; None when all are bitwise equal."""
    for step in sorted(steps):
        a, b = reference.get(step), other.get(step)
        if a is None or b is None:
            return f"step {step}: reported by {'only the other run' if a is None else 'only the reference run'}"
        for name in sorted(a.keys() | b.keys()):
            if name not in a or name not in b or not _same(a[name], b[name]):
                return f"step {step}: metric {name!r} {_show(a, name)} vs {_show(b, name)}"
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()  # bitwise: -0.0 differs from 0.0
    return type(a) is type(b) and bool(a == b)


def _show(metrics: dict[str, Any], name: str) -> str:
    return repr(metrics[name]) if name in metrics else "(missing)"


def first_state_difference(diff: CheckpointDiff) -> str | None:
    """The first difference between two final checkpoints, in the order the checkpoint holds it."""
    if diff.checkpoint:
        value = diff.checkpoint[0]
        return f"the final checkpoints differ in {value.name}: {value.a!r} vs {value.b!r}"
    if diff.only_a or diff.only_b:
        return f"state entries in one final checkpoint only: {', '.join((*diff.only_a, *diff.only_b))}"
    for entry in (*diff.entries, diff.metrics, diff.metadata):
        if not entry.identical:
            return f"first differing state entry: {entry.name} ({_entry_difference(entry)})"
    return None


def _entry_difference(entry: EntryDiff) -> str:
    if entry.differing_tensors:
        t = entry.differing_tensors[0]
        size = f", max |a-b| {t.max_abs:.3g}" if t.max_abs is not None else ""
        more = f"; {len(entry.differing_tensors) - 1} more tensors differ" if len(entry.differing_tensors) > 1 else ""
        return f"{t.name}: {t.differing} of {t.elements} elements differ{size}{more}"
    if entry.changed:
        c = entry.changed[0]
        return f"{c.name}: {c.a} vs {c.b}"
    if entry.values:
        v = entry.values[0]
        return f"{v.name}: {v.a!r} vs {v.b!r}"
    if entry.only_a or entry.only_b:
        return f"in one checkpoint only: {', '.join((*entry.only_a, *entry.only_b))}"
    return f"kind {entry.kind_a} vs {entry.kind_b}"


def unused_streams(*runs: Run) -> set[str]:
    """The RNG streams no run drew from: the same fingerprint at its restore and at every step.  An
    unseeded stream (NumPy's and Python's global generators are seeded from the OS at start-up) that
    training never uses differs from run to run in the checkpoint, and cannot change any result."""
    unused: set[str] | None = None
    for run in runs:
        seen: dict[str, set[str]] = {}
        for fingerprint in [*run.step_rng.values(), run.restored_rng or {}]:
            for stream, digest in fingerprint.items():
                seen.setdefault(stream, set()).add(digest)
        constant = {stream for stream, digests in seen.items() if len(digests) == 1}
        unused = constant if unused is None else unused & constant
    return unused or set()


def without_streams(diff: CheckpointDiff, streams: set[str]) -> CheckpointDiff:
    """``diff`` with the differences of the RNG ``streams`` left out."""
    prefixes = tuple(f"{RNG_KEY}/{stream}" for stream in streams)

    def kept(name: str) -> bool:
        return not any(name == p or name.startswith(p + "/") for p in prefixes)

    entries = tuple(replace(e, differing_tensors=tuple(t for t in e.differing_tensors if kept(t.name)),
                            values=tuple(v for v in e.values if kept(v.name)),
                            changed=tuple(c for c in e.changed if kept(c.name)))
                    if e.name == RNG_KEY and prefixes else e for e in diff.entries)
    return replace(diff, entries=entries)


def compare_repeat(first: Run, second: Run, diff: CheckpointDiff) -> Verdict:
    """Two uninterrupted runs: any difference means the script is not deterministic."""
    metric = first_metric_difference(first.steps, second.steps, sorted(first.steps.keys() | second.steps.keys()))
    state = first_state_difference(diff)
    if metric is None and state is None:
        return Verdict(True)
    findings = [f"first differing {metric}" if metric else "the metrics of every step are identical", state or
                "the final checkpoints are identical"]
    hints = ["the two uninterrupted runs differ, so the script is not deterministic and no resume can match it; "
             "the usual causes:", *(f"  - {cause}" for cause in NONDETERMINISM_CAUSES)]
    return Verdict(False, [f for f in findings if f], hints)


def compare_resume(reference: Run, killed: Run, resumed: Run, diff: CheckpointDiff,
                   unused: set[str] | None = None) -> Verdict:
    """A run killed and resumed against the uninterrupted ``reference``; the RNG streams ``unused``
    (see :func:`unused_streams`) are left out of the fingerprints compared."""
    restored = resumed.restored
    before = first_metric_difference(reference.steps, killed.steps, sorted(killed.steps))
    after_steps = sorted(s for s in reference.steps.keys() | resumed.steps.keys() if s > restored)
    after = first_metric_difference(reference.steps, resumed.steps, after_steps)
    state = first_state_difference(diff)
    if before is None and after is None and state is None:
        return Verdict(True)
    findings = []
    if before is not None:
        findings.append(f"the killed run already differed before the kill, at {before}: the script is not "
                        "deterministic (the two uninterrupted runs happened to match)")
    findings.append(f"first differing {after}" if after else "the metrics of every step after the resume are identical")
    findings.append(state or "the final checkpoints are identical")
    return Verdict(False, findings, _hints(reference, killed, resumed, after, state, unused or set()))


def _hints(reference: Run, killed: Run, resumed: Run, after: str | None, state: str | None,
           unused: set[str]) -> list[str]:
    restored = resumed.restored
    hints = []
    pending = sorted(s for run in (reference, killed) for s, save in run.saves.items() if save.get("grads_pending"))
    if pending:
        hints.append(f"hint: parameters held gradients that no optimizer step had applied when step {pending[0]} was "
                     "saved (a save between gradient-accumulation micro-steps): a checkpoint holds no .grad, so the "
                     "resumed run lost the accumulated gradients. Call ckpt.step(n) after optimizer.step() and "
                     "optimizer.zero_grad(), once per optimizer step, never between micro-steps.")
    saved_rng = _used(killed.saves.get(restored, {}).get("rng"), unused)
    restored_rng = _used(resumed.restored_rng, unused)
    if resumed.seeds:
        seed = resumed.seeds[0]
        hints.append(f"hint: something reseeds after restore(): {seed['call']} at {seed['where']} ran between "
                     f"restore() (step {restored}) and the first step after it, replacing the RNG streams the "
                     "checkpoint put back" + _rng_evidence(reference, resumed, restored + 1, unused)
                     + ". Seed once, before restore(); seed per epoch only when an epoch starts at its first step, "
                     "not when resuming inside it.")
    elif saved_rng is not None and restored_rng is not None and saved_rng != restored_rng:
        hints.append("hint: the RNG streams right after restore() differ from those saved at step "
                     f"{restored} ({_streams(saved_rng, restored_rng)}): the checkpoint holds no RNG "
                     "(capture_rng=False?), so the resumed run draws from a freshly seeded generator.")
    right_after = after is not None and after.startswith(f"step {restored + 1}:")
    rng_same_at_save = saved_rng is not None and saved_rng == _used(reference.step_rng.get(restored), unused)
    if not resumed.seeds and not pending and right_after and rng_same_at_save:
        hints.append(f"hint: the metrics are identical up to the resume step ({restored}) and differ right after "
                     "it, with the RNG streams identical at the save: the first step after a resume depends on state "
                     "held outside the registered entries, such as a batch prefetched before step() (nanoGPT's "
                     "`X, Y = get_batch('train')` at the end of its loop)" + _rng_evidence(reference, resumed,
                                                                                         restored + 1, unused)
                     + ". Register it in the state, or draw the next batch at the start of the step.")
    elif not hints and after is not None and not right_after:
        hints.append(f"hint: the resumed run matched the uninterrupted one after step {restored} for a while and "
                     f"then diverged ({after.split(':')[0]}): state used only from then on is outside the registered "
                     "entries (a data loader or sampler position at an epoch end, a counter, a scheduler or a "
                     "GradScaler not in the state).")
    elif not hints and after is None and state is not None:
        hints.append("hint: every metric matches but the final checkpoint does not: state that the metrics do not "
                     "show yet is outside the registered entries or not restored (see the entry above).")
    return hints


def _used(fingerprint: dict[str, str] | None, unused: set[str]) -> dict[str, str] | None:
    return None if fingerprint is None else {k: v for k, v in fingerprint.items() if k not in unused}


def _rng_evidence(reference: Run, resumed: Run, step: int, unused: set[str]) -> str:
    a, b = _used(reference.step_rng.get(step), unused), _used(resumed.step_rng.get(step), unused)
    if a is None or b is None or a == b:
        return ""
    return f" (at step {step} the RNG streams differ from the uninterrupted run's: {_streams(a, b)})"


def _streams(a: dict[str, str], b: dict[str, str]) -> str:
    return ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))) or "none"
