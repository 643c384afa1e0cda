"""``unbroken check``: passes on the examples, fails with the right hint on scripts with each defect a
real adoption hit (issue 18): a prefetched batch outside the state (nanoGPT), a reseed after restore
(MiniMind), a save between gradient-accumulation micro-steps, a script that is not deterministic.

Each check runs the command 2-6 times (torch-importing subprocesses): the default suite checks one
example with one kill; the rest is marked slow.  The verdicts' hints are also tested in-process on
synthetic logs, at no cost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from unbroken.cli.check_command import _default_kills
from unbroken.cli.check_runner import Run
from unbroken.cli.check_verdict import compare_resume
from unbroken.cli.main import main
from unbroken.interchange.diff_result import CheckpointDiff, Side

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SCRIPTS = Path(__file__).resolve().parent / "check_scripts"


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out + err


def script(name: str, *args: str) -> list[str]:
    return ["--", sys.executable, str(SCRIPTS / name), "--run-dir", "runs/never-used", *args]


def test_check_proves_the_plain_loop_example_resumes_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--kill-at", "6", "--", sys.executable, str(EXAMPLES / "plain_loop.py"),
                      "--run-dir", "runs/never-used", "--steps", "10", "--save-interval", "4")
    assert code == 0, out
    assert "uninterrupted run: 10 steps (1..10), saves at 4, 8, 10" in out
    assert "a second uninterrupted run: identical" in out
    assert "killed at step 6" in out and "resumed from step 4: identical" in out
    assert "resume is EXACT" in out
    assert not Path("runs/never-used").exists()  # UNBROKEN_RUN_DIR replaced the script's directory


def test_check_usage_errors_and_a_failing_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys)
    assert code == 2 and "no command to check" in out
    code, out = check(capsys, "--", sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)")
    assert code == 2 and "failed with exit status 3" in out and "boom" in out
    code, out = check(capsys, "--", sys.executable, "-c", "pass")
    assert code == 2 and "no CheckpointManager in it reported a step" in out
    with pytest.raises(SystemExit):
        main(["check", "--kill-at", "0", "--", "true"])


def test_default_kills_are_one_step_between_two_saves_and_one_that_starts_a_save() -> None:
    assert _default_kills(list(range(1, 21)), [5, 10, 15, 20]) == [8, 10]
    assert _default_kills(list(range(1, 11)), [4, 8, 10]) == [6, 8]
    assert _default_kills(list(range(1, 11)), [10]) == [5]  # only the final save: a kill before any checkpoint


# -- the hints, on synthetic logs (what the manager's check log holds) ---------------------------------
RNG_A, RNG_B = {"torch": "aa"}, {"torch": "bb"}


def _run(name: str, restored: int, steps: dict[int, float], rng: dict[int, dict[str, str]] | None = None,
         saves: dict[int, bool] | None = None, seeds: list[dict] | None = None) -> Run:
    rng = rng or {}
    records: list[dict] = [{"event": "restore", "step": restored, "rng": rng.get(restored, RNG_A)}]
    records += [{"event": "seed", **seed} for seed in seeds or []]
    for step, loss in steps.items():
        records.append({"event": "step", "step": step, "metrics": {"loss": loss}, "rng": rng.get(step, RNG_A)})
        if step in (saves or {}):
            records.append({"event": "save", "step": step, "rng": rng.get(step, RNG_A),
                            "grads_pending": (saves or {})[step]})
    return Run(name, Path(name), 0, Path(f"{name}.err"), records)


def _same_checkpoints() -> CheckpointDiff:
    return CheckpointDiff(Side("a", 8, 1), Side("b", 8, 1), 0.0)


REFERENCE = _run("reference", 0, {s: float(s) for s in range(1, 9)}, saves={4: False, 8: False})
KILLED = _run("killed", 0, {s: float(s) for s in range(1, 7)}, saves={4: False})


def test_hint_a_difference_right_after_the_resume_with_the_rng_equal_at_the_save_is_state_outside() -> None:
    resumed = _run("resumed", 4, {5: 99.0, 6: 6.0, 7: 7.0, 8: 8.0}, rng={5: RNG_B})
    verdict = compare_resume(REFERENCE, KILLED, resumed, _same_checkpoints())
    assert not verdict.identical
    assert verdict.findings[0] == "first differing step 5: metric 'loss' 5.0 vs 99.0"
    assert len(verdict.hints) == 1 and "state held outside the registered entries" in verdict.hints[0]
    assert "prefetched" in verdict.hints[0] and "RNG streams differ from the uninterrupted run's: torch" in (
        verdict.hints[0])


def test_hint_a_seed_call_between_restore_and_the_first_step_is_a_reseed_after_restore() -> None:
    seed = {"call": "torch.manual_seed(42)", "where": "train.py:17 (main)", "after_restore": 4}
    resumed = _run("resumed", 4, {5: 99.0, 6: 6.0, 7: 7.0, 8: 8.0}, rng={5: RNG_B}, seeds=[seed])
    hints = compare_resume(REFERENCE, KILLED, resumed, _same_checkpoints()).hints
    assert len(hints) == 1 and "something reseeds after restore(): torch.manual_seed(42) at train.py:17" in hints[0]


def test_hint_gradients_pending_at_a_save_is_a_save_between_accumulation_micro_steps() -> None:
    killed = _run("killed", 0, {s: float(s) for s in range(1, 7)}, saves={4: True})
    resumed = _run("resumed", 4, {5: 5.0, 6: 99.0, 7: 7.0, 8: 8.0})
    hints = compare_resume(REFERENCE, killed, resumed, _same_checkpoints()).hints
    assert len(hints) == 1 and "a save between gradient-accumulation micro-steps" in hints[0]
    assert "after optimizer.step() and optimizer.zero_grad()" in hints[0]


def test_hint_rng_restored_unlike_the_saved_one() -> None:
    resumed = _run("resumed", 4, {5: 99.0, 6: 6.0, 7: 7.0, 8: 8.0}, rng={4: RNG_B, 5: RNG_B})
    hints = compare_resume(REFERENCE, KILLED, resumed, _same_checkpoints()).hints
    assert any("differ from those saved at step 4 (torch)" in h and "capture_rng=False" in h for h in hints)


def test_identical_logs_and_checkpoints_are_exact() -> None:
    resumed = _run("resumed", 4, {5: 5.0, 6: 6.0, 7: 7.0, 8: 8.0})
    assert compare_resume(REFERENCE, KILLED, resumed, _same_checkpoints()).identical


# -- real runs: every example, every defect -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("example", [
    ["plain_loop.py", "--steps", "12", "--save-interval", "4"],
    ["gpt_pretrain.py", "--steps", "12", "--save_interval", "4"],
    ["consistency_distill.py", "--steps", "12", "--save_interval", "4"],
    ["dataloader_resume.py", "--epochs", "2", "--workers", "0"],
], ids=lambda e: e[0])
def test_check_passes_on_each_single_process_example(capsys: pytest.CaptureFixture[str], example: list[str]) -> None:
    code, out = check(capsys, "--", sys.executable, str(EXAMPLES / example[0]), "--run-dir", "runs/never-used",
                      *example[1:])
    assert code == 0, out
    assert "resume is EXACT" in out and "DIFFERENT" not in out
    assert out.count("killed at step") == (1 if example[0] == "dataloader_resume.py" else 2)  # it saves every step


@pytest.mark.slow
def test_check_passes_on_an_exact_script_ended_early_by_steps(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--steps", "12", "--kill-at", "7", *script("exact.py"))
    assert code == 0, out
    assert "uninterrupted run: 12 steps (1..12), saves at 5, 10, 12" in out


@pytest.mark.slow
def test_check_finds_the_prefetched_batch_outside_the_state(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--kill-at", "7", *script("prefetch.py"))
    assert code == 1, out
    assert "resumed from step 5: DIFFERENT" in out and "first differing step 6: metric 'loss'" in out
    assert "first differing state entry: model (model/weight" in out
    assert "state held outside the registered entries, such as a batch prefetched" in out
    assert "reseeds" not in out and "micro-steps" not in out


@pytest.mark.slow
def test_check_finds_the_reseed_after_restore(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--kill-at", "7", *script("reseed.py"))
    assert code == 1, out
    assert "first differing step 6" in out
    assert "something reseeds after restore(): torch.manual_seed(42) at " in out and "reseed.py:" in out
    assert "prefetched" not in out


@pytest.mark.slow
def test_check_finds_the_save_between_accumulation_micro_steps(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--kill-at", "7", *script("accumulate.py"))
    assert code == 1, out
    assert "resumed from step 5: DIFFERENT" in out and "first differing step 7" in out
    assert "when step 5 was saved (a save between gradient-accumulation micro-steps)" in out


@pytest.mark.slow
def test_check_says_a_nondeterministic_script_is_not_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--keep", *script("nondeterministic.py"))
    assert code == 1, out
    assert "a second uninterrupted run: DIFFERENT" in out and "first differing step 1: metric 'loss'" in out
    assert "first differing state entry: model (model/" in out
    assert "unseeded generators" in out and "cudnn.benchmark" in out and "NOT DETERMINISTIC" in out
    kept = Path(out.split("kept: ")[1].split(" ")[0])
    assert (kept / "uninterrupted-1.jsonl").is_file() and (kept / "uninterrupted-2").is_dir()
    assert "killed" not in out  # no kill: a resume cannot match a run that does not match itself


@pytest.mark.slow
def test_check_refuses_a_script_that_never_restores(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--kill-at", "7", "--steps", "10", *script("no_restore.py"))
    assert code == 2, out
    assert "never calls restore()" in out
