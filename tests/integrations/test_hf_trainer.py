"""unbroken.integrations.transformers: the Hugging Face Trainer resumes bit-exactly from unbroken checkpoints.

Real processes run tests/integrations/hf_train.py (a tiny GPT-2 with dropout, 2 micro-batches per
update, 5 updates per epoch, 12 updates): SIGKILLed mid-epoch and run again with the same command.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import unbroken
from tests.shared_reference import session_environment, shared_run

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("transformers")


def run_worker(tmp: Path, name: str, kill_at: int = 0, adapter: bool = True, wait: bool = True,
               signal: str = "SIGKILL") -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_KILL_AT": str(kill_at), "HF_SIGNAL": signal,
           "HF_ADAPTER": "1" if adapter else "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.integrations.hf_train", str(tmp / f"{name}-out"),
                             str(tmp / f"{name}-run"), str(tmp / name)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        finish(proc, expected=(-9 if signal == "SIGKILL" else unbroken.EXIT_PREEMPTED) if kill_at else 0)
    return proc


def finish(proc: subprocess.Popen[str], expected: int = 0) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == expected, f"worker exited {proc.returncode}, expected {expected}:\n{err[-3000:]}"
    return err


def final(tmp: Path, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((tmp / f"{name}.json").read_text()), load_file(tmp / f"{name}.safetensors")


def step_lines(tmp: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp / f"{name}.steps.jsonl").read_text().splitlines()]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise equal: {different}"


def run_references(tmp: Path) -> dict[str, Any]:
    procs = [run_worker(tmp, "ref", wait=False), run_worker(tmp, "bare", adapter=False, wait=False)]
    for proc in procs:
        finish(proc)
    return {}  # what the tests compare is in the files under tmp


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two uninterrupted runs at once: with the adapter ("ref") and the bare Trainer ("bare"); run once
    per session and shared by the xdist workers."""
    key = {"module": "tests.integrations.hf_train", "env": session_environment()}
    return shared_run(tmp_path_factory, "hf-trainer", key, run_references)[0]


def test_uninterrupted_run_with_the_adapter_equals_the_bare_trainer_bitwise(reference: Path) -> None:
    ref, ref_tensors = final(reference, "ref")
    bare, bare_tensors = final(reference, "bare")
    assert ref == bare  # global_step, epoch, total_flos, every log entry, float for float
    assert ref["global_step"] == 12 and len(ref["logged"]) == 6
    assert_same_tensors(ref_tensors, bare_tensors)  # weights and optimizer state
    assert step_lines(reference, "ref") == step_lines(reference, "bare")  # every micro-batch loss
    # The adapter's checkpoints replace the Trainer's checkpoint-N folders (the bare Trainer writes them).
    assert not list((reference / "ref-out").glob("checkpoint-*"))
    assert sorted(p.name for p in (reference / "bare-out").glob("checkpoint-*")) == [
        "checkpoint-12", "checkpoint-4", "checkpoint-8"]
    # Saves when every_steps=3 or the Trainer's save_steps=4 ask, and at the end; keep_last=2.
    assert [r.step for r in unbroken.list_checkpoints(reference / "ref-run", verify=True)] == [9, 12]


def flip_tensor_byte(checkpoint: Path) -> None:
    (data,) = [p for p in checkpoint.iterdir() if p.name != "manifest.json"]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.write_bytes(bytes(raw))


def test_killed_and_stopped_mid_epoch_the_same_command_resumes_bit_exact_past_a_corrupt_checkpoint(
        reference: Path, tmp_path: Path) -> None:
    ref, ref_tensors = final(reference, "ref")
    ref_steps = {line["step"]: line["losses"] for line in step_lines(reference, "ref") if "step" in line}
    run = tmp_path / "run-run"

    run_worker(tmp_path, "run", kill_at=8)  # SIGKILL; saved 3, 4, 6 (keep_last=2): 4 and 6 remain
    assert [r.step for r in unbroken.list_checkpoints(run)] == [4, 6]
    flip_tensor_byte(run / "step_000000006")
    # 6 is corrupt: resumes from 4 (epoch 0, 4 of 5 updates); saves 6, 8, 9; SIGTERM at 11 saves 11, exits 75
    run_worker(tmp_path, "run", kill_at=11, signal="SIGTERM")
    assert [r.step for r in unbroken.list_checkpoints(run)] == [9, 11]
    assert [r.step for r in unbroken.list_checkpoints(run, quarantined=True) if r.quarantined] == [6]
    run_worker(tmp_path, "run")  # resumes from 11: mid-epoch 2, its loss not yet logged (logging_steps=2)

    lines = step_lines(tmp_path, "run")
    assert [line["start"] for line in lines if "start" in line] == [0, 4, 11]
    trained = [line for line in lines if "step" in line]
    assert [line["step"] for line in trained] == [*range(1, 9), *range(5, 12), 12]
    for line in trained:  # the same batches, dropout masks and weights at every step, before and after resumes
        assert line["losses"] == ref_steps[line["step"]], f"step {line['step']}"
    resumed, resumed_tensors = final(tmp_path, "run")
    assert resumed == ref  # TrainerState: global_step, epoch, total_flos, log_history's losses, lr, grad_norm
    assert_same_tensors(resumed_tensors, ref_tensors)
    assert [r.step for r in unbroken.list_checkpoints(run, verify=True)] == [11, 12]


# -- in-process checks: the refusals and the missing-framework message --------------------------------------

def test_importing_without_transformers_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "unbroken.integrations.transformers", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=r'pip install "unbroken\[transformers\]"'):
        importlib.import_module("unbroken.integrations.transformers")
    monkeypatch.delitem(sys.modules, "unbroken.integrations.transformers", raising=False)


def tiny_trainer(tmp_path: Path, **args: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    return Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True,
                                                       report_to=[], **args))


def test_resumable_refuses_a_misspelt_option_and_what_it_cannot_resume(tmp_path: Path) -> None:
    from unbroken.integrations.transformers import resumable
    with pytest.raises(TypeError, match=r"'keep_lats' \(did you mean 'keep_last'"):
        resumable(tiny_trainer(tmp_path), tmp_path / "run", keep_lats=3)
    best = tiny_trainer(tmp_path)
    best.args.load_best_model_at_end = True  # (its eval set-up does not matter here)
    with pytest.raises(ValueError, match="load_best_model_at_end reads the Trainer's checkpoint-N folders"):
        resumable(best, tmp_path / "run")
    with pytest.raises(TypeError, match="takes a transformers.Trainer"):
        resumable(object(), tmp_path / "run")  # type: ignore[type-var]


def test_resumable_keeps_the_trainer_object_and_its_class_and_defaults_to_output_dir(tmp_path: Path) -> None:
    from transformers import Trainer

    from unbroken.integrations.transformers import Checkpoints, resumable
    trainer = tiny_trainer(tmp_path)
    assert resumable(trainer, keep_last=2) is trainer
    assert isinstance(trainer, Trainer) and type(trainer).__name__ == "ResumableTrainer"
    assert isinstance(trainer.unbroken, Checkpoints) and trainer.unbroken.manager is None
    assert trainer.unbroken.directory == str(tmp_path / "out" / "unbroken")
    assert type(resumable(trainer, tmp_path / "other")) is type(trainer)  # wrapping twice: one subclass
