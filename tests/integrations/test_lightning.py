"""The Lightning adapter: ``callbacks=[Unbroken(...)]`` + ``fit(ckpt_path="last")`` resumes bit-exactly.

One uninterrupted in-process run (12 steps, 10 batches per epoch) is the reference every resumed run
is compared with, bitwise: per-step losses, weights, Adam state, global step, epoch, learning rate.
Crashes are real SIGKILLs of worker processes (tests/integrations/lightning_train.py) re-run with the
same command; the cheaper scenarios (stop signal, corrupt newest checkpoint, mirror) run in-process.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from safetensors.torch import load_file  # noqa: E402

import unbroken  # noqa: E402
from tests.distributed.harness import launch as launch_ranks  # noqa: E402
from tests.distributed.harness import run_ok, wait_all  # noqa: E402
from tests.integrations import lightning_train as worker  # noqa: E402

# Lightning's own notices: no "last" yet on a first fit, and a deprecation inside Lightning.
pytestmark = [pytest.mark.filterwarnings("ignore:.*there is no last checkpoint available"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec")]
WORKER = Path(worker.__file__)
STEPS, KILL_AT, EVERY = 12, 7, 3


@dataclass
class Result:
    losses: dict[int, str]  # step -> loss (float.hex) of the last run that computed it
    tensors: dict[str, torch.Tensor]
    counters: dict[str, Any]


@pytest.fixture(scope="module")
def quiet() -> Iterator[None]:
    """One thread (as the workers); Lightning's seed variable kept to this module."""
    threads, seed_env = torch.get_num_threads(), os.environ.get("PL_GLOBAL_SEED")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if seed_env is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = seed_env


def fit(run_dir: Path | None, max_steps: int = STEPS, **kw: Any) -> Result:
    t, model = worker.train(run_dir, max_steps, EVERY, **kw)
    return Result(dict(model.losses), worker.final_tensors(t, model), worker.counters(t))


@pytest.fixture(scope="module")
def reference(quiet: None, tmp_path_factory: pytest.TempPathFactory) -> Result:
    return fit(tmp_path_factory.mktemp("reference") / "run")


def assert_same(result: Result, ref: Result, steps: range = range(1, STEPS + 1)) -> None:
    assert result.counters == ref.counters
    assert result.tensors.keys() == ref.tensors.keys()
    for name, tensor in ref.tensors.items():
        assert torch.equal(result.tensors[name], tensor), name
    assert {s: result.losses[s] for s in steps} == {s: ref.losses[s] for s in steps}


def test_uninterrupted_runs_are_reproducible(reference: Result, tmp_path: Path) -> None:
    """The premise of every comparison below: two uninterrupted runs are bitwise equal."""
    assert sorted(reference.losses) == list(range(1, STEPS + 1))
    assert reference.counters["global_step"] == STEPS
    assert_same(fit(tmp_path / "run"), reference)


def test_run_directory_is_an_unbroken_run(reference: Result, tmp_path: Path) -> None:
    """step_* checkpoints every 3 steps plus the last step, verified by unbroken; keep_last applies."""
    fit(tmp_path / "run", keep_last=2, max_steps=8)
    records = unbroken.list_checkpoints(tmp_path / "run", verify=True)
    assert [(r.step, r.valid) for r in records] == [(6, True), (8, True)]
    info = unbroken.read_info(tmp_path / "run" / "step_000000008")
    assert {"model", "lightning"} <= set(info.state)
    weights = unbroken.read_state_dict(tmp_path / "run", "model")
    assert set(weights) == {k.removeprefix("model.") for k in reference.tensors if k.startswith("model.")}


def test_fit_continues_from_the_last_step_saved_by_a_finished_fit(reference: Result, tmp_path: Path) -> None:
    fit(tmp_path / "run", max_steps=8)
    resumed = fit(tmp_path / "run")
    assert sorted(resumed.losses) == list(range(9, STEPS + 1))
    assert_same(resumed, reference, range(9, STEPS + 1))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference: Result, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(run, max_steps=8)  # checkpoints 3, 6 and 8
    (data,) = (run / "step_000000008").glob("*.safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.warns(unbroken.CheckpointSkippedWarning):
        resumed = fit(run)
    assert sorted(resumed.losses) == list(range(7, STEPS + 1))  # from step 6, mid-epoch
    assert_same(resumed, reference, range(7, STEPS + 1))
    assert [r.step for r in unbroken.list_checkpoints(run, quarantined=True) if r.quarantined] == [8]


def test_sigterm_saves_that_step_exits_75_and_resumes_exactly(reference: Result, tmp_path: Path) -> None:
    """Lightning's own SIGTERM handling would end the fit without a checkpoint; the manager's stop wins."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        fit(run, signal_at=(5, signal.SIGTERM))
    assert stopped.value.code == unbroken.EXIT_PREEMPTED
    assert [r.step for r in unbroken.list_checkpoints(run)] == [3, 5]
    resumed = fit(run)
    assert sorted(resumed.losses) == list(range(6, STEPS + 1))
    assert_same(resumed, reference, range(6, STEPS + 1))


def test_a_new_machine_resumes_from_the_mirror(reference: Result, tmp_path: Path) -> None:
    run, mirror = tmp_path / "run", tmp_path / "mirror"
    fit(run, max_steps=8, mirror_to=str(mirror))
    assert 8 in [r.step for r in unbroken.list_checkpoints(mirror)]
    shutil.rmtree(run)
    resumed = fit(run, mirror_to=str(mirror))
    assert_same(resumed, reference, range(9, STEPS + 1))


def test_without_the_adapter_the_script_still_trains(reference: Result, tmp_path: Path) -> None:
    plain = fit(None, root=tmp_path)
    assert plain.counters == reference.counters
    assert sorted(plain.losses) == list(range(1, STEPS + 1))


def test_unknown_option_is_refused_with_its_name() -> None:
    from unbroken.integrations.lightning import Unbroken

    with pytest.raises(TypeError, match="'keep_lats'"):
        Unbroken("runs/x", keep_lats=3)


def test_hyperparameters_needing_pickle_are_left_out_with_a_warning(quiet: None, tmp_path: Path) -> None:
    class WithModule(worker.Net):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"activation": torch.nn.ReLU()})

    import lightning.pytorch as L

    from unbroken.integrations.lightning import Unbroken

    trainer = worker.trainer(3, [Unbroken(tmp_path / "run", every_steps=3)], root=tmp_path)
    with pytest.warns(UserWarning, match="hyper_parameters hold values that cannot be stored"):
        trainer.fit(WithModule(), ckpt_path="last")
    assert isinstance(trainer, L.Trainer)
    assert [r.step for r in unbroken.list_checkpoints(tmp_path / "run", verify=True)] == [3]


def test_importing_without_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "unbroken.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r'pip install "unbroken\[lightning\]"'):
        importlib.import_module("unbroken.integrations.lightning")


# -- real crashes -------------------------------------------------------------------------------------

def read_result(out: Path, rank: int = 0) -> tuple[list[tuple[int, str]], Result]:
    """Every (step, loss) line the runs wrote in order, and the final state."""
    lines = [tuple(json.loads(line)) for line in (out / f"losses.rank{rank}.jsonl").read_text().splitlines()]
    recorded: list[tuple[int, str]] = [(int(s), str(v)) for s, v in lines]
    return recorded, Result(dict(recorded), dict(load_file(str(out / "final.safetensors"))),
                            json.loads((out / "final.json").read_text()))


def assert_resumed_mid_epoch(recorded: list[tuple[int, str]]) -> None:
    """The killed run got to KILL_AT; the second run started again after a checkpoint before it."""
    steps = [s for s, _ in recorded]
    assert steps[:KILL_AT] == list(range(1, KILL_AT + 1))
    restart = steps[KILL_AT]
    assert restart in (4, 7)  # after checkpoint 3 or 6 (6 may still be in flight at the kill)
    assert steps[KILL_AT:] == list(range(restart, STEPS + 1))


def test_sigkill_mid_epoch_and_the_same_command_again_is_bit_exact(reference: Result, tmp_path: Path) -> None:
    cmd = [sys.executable, str(WORKER), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
           "--kill-at", str(KILL_AT), "--every", str(EVERY), "--max-steps", str(STEPS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded, result = read_result(tmp_path / "out")
    assert_resumed_mid_epoch(recorded)
    for step, loss in recorded:  # the killed run's steps too: each equals the reference's
        assert loss == reference.losses[step], step
    assert_same(result, reference)
    assert all(r.valid for r in unbroken.list_checkpoints(tmp_path / "run", verify=True))


@pytest.mark.timeout(600)
def test_ddp_two_ranks_sigkill_mid_epoch_resume_is_bit_exact(tmp_path: Path) -> None:
    """Lightning's DDP strategy (gloo, 2 CPU ranks): every rank SIGKILLed at step 7, the same command
    again on both ranks, compared with an uninterrupted 2-rank run."""
    def args(name: str, kill: bool) -> list[object]:
        extra = ["--kill-at", KILL_AT] if kill else []
        return ["--run-dir", tmp_path / name, "--out", tmp_path / f"{name}-out", "--devices", 2, *extra]

    run_ok(WORKER, args("reference", False), 2, tmp_path / "logs-reference", timeout=300)
    killed = launch_ranks(WORKER, args("run", True), 2, tmp_path / "logs-killed")
    assert wait_all(killed, 300) == [-signal.SIGKILL, -signal.SIGKILL]
    run_ok(WORKER, args("run", True), 2, tmp_path / "logs-resumed", timeout=300)
    for rank in (0, 1):
        recorded, _ = read_result(tmp_path / "run-out", rank)
        ref_recorded, _ = read_result(tmp_path / "reference-out", rank)
        assert_resumed_mid_epoch(recorded)
        ref_losses = dict(ref_recorded)
        assert [loss == ref_losses[step] for step, loss in recorded] == [True] * len(recorded)
    _, result = read_result(tmp_path / "run-out")
    _, ref = read_result(tmp_path / "reference-out")
    assert_same(result, ref)
