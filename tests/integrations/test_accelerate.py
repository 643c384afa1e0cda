"""The Accelerate adapter: ``Checkpointing(accelerator, dir)`` + ``ckpt.restore()`` resumes bit-exactly,
and a loader prepared by ``accelerator.prepare`` resumes at the next batch (it used to crash the first save).

One uninterrupted in-process run (12 optimizer steps, 5 per epoch, gradient accumulation over 2
batches) is the reference every resumed run is compared with, bitwise: per-step losses, weights, Adam
state, the step counter, ``accelerator.step``, the loader's epoch, the learning rate.  The crash is a
real SIGKILL of a worker process (tests/integrations/accelerate_train.py) re-run with the same command;
the cheaper scenarios run in-process.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")

from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset  # noqa: E402

import unbroken  # noqa: E402
from tests.integrations import accelerate_train as worker  # noqa: E402

WORKER = Path(worker.__file__)
STEPS, KILL_AT = worker.STEPS, 8
Result = dict[str, Any]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Result:
    threads = torch.get_num_threads()
    try:
        return worker.train(tmp_path_factory.mktemp("reference") / "run")
    finally:
        torch.set_num_threads(threads)


def assert_same(result: Result, ref: Result, steps: range = range(1, STEPS + 1)) -> None:
    assert result["counters"] == ref["counters"]
    assert result["tensors"].keys() == ref["tensors"].keys()
    for name, tensor in ref["tensors"].items():
        assert torch.equal(result["tensors"][name], tensor), name
    assert {s: result["losses"][s] for s in steps} == {s: ref["losses"][s] for s in steps}


def test_uninterrupted_runs_are_reproducible(reference: Result, tmp_path: Path) -> None:
    """The premise of every comparison below: two uninterrupted runs are bitwise equal."""
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    assert reference["counters"]["step"] == STEPS and reference["counters"]["epoch"] == 2
    assert_same(worker.train(tmp_path / "run", keep_last=2), reference)
    records = unbroken.list_checkpoints(tmp_path / "run", verify=True)
    assert [(r.step, r.valid) for r in records] == [(9, True), (12, True)]
    assert {"model", "optimizer", "scheduler", "dataloader", "accelerate"} <= set(
        unbroken.read_info(records[-1].path).state)
    weights = unbroken.read_state_dict(tmp_path / "run", "model")  # the unwrapped model's names
    assert set(weights) == {k.removeprefix("model.") for k in reference["tensors"] if k.startswith("model.")}


def read_result(out: Path) -> tuple[list[tuple[int, str]], Result]:
    """Every (step, loss) line the runs wrote in order, and the final state."""
    recorded = [(int(s), str(v)) for s, v in map(json.loads, (out / "losses.rank0.jsonl").read_text().splitlines())]
    return recorded, {"losses": dict(recorded), "tensors": load_file(str(out / "final.rank0.safetensors")),
                      "counters": json.loads((out / "final.rank0.json").read_text())}


def test_sigkill_mid_epoch_and_the_same_command_again_is_bit_exact(reference: Result, tmp_path: Path) -> None:
    cmd = [sys.executable, str(WORKER), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": str(KILL_AT)}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = [r.step for r in unbroken.list_checkpoints(tmp_path / "run")]
    assert saved in ([3], [3, 6])  # 6 may still have been in flight (async save) at the kill
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded, result = read_result(tmp_path / "out")
    steps = [s for s, _ in recorded]
    assert steps == [*range(1, KILL_AT + 1), *range(saved[-1] + 1, STEPS + 1)]  # resumed mid-epoch
    for step, loss in recorded:  # the killed run's steps too: each equals the reference's
        assert loss == reference["losses"][step], step
    assert_same(result, reference)


def test_resume_at_an_epoch_boundary_is_bit_exact(reference: Result, tmp_path: Path) -> None:
    """Saved after the last batch of epoch 0 (the prepared loader already saw its end): the resumed run
    starts epoch 1 with epoch 1's order, not epoch 0's again."""
    worker.train(tmp_path / "run", max_steps=5)
    resumed = worker.train(tmp_path / "run")
    assert sorted(resumed["losses"]) == list(range(6, STEPS + 1))
    assert_same(resumed, reference, range(6, STEPS + 1))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference: Result, tmp_path: Path) -> None:
    run = tmp_path / "run"
    worker.train(run, max_steps=7)  # checkpoints 3, 6 and 7
    data = run / "step_000000007" / "rank00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.warns(unbroken.CheckpointSkippedWarning):
        resumed = worker.train(run)
    assert sorted(resumed["losses"]) == list(range(7, STEPS + 1))  # from step 6, mid-epoch
    assert_same(resumed, reference, range(7, STEPS + 1))


def test_without_the_adapter_the_script_still_trains(tmp_path: Path) -> None:
    result = worker.train(None)
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    assert not list(tmp_path.iterdir())


# -- the prepared loader in a plain CheckpointManager ---------------------------------------------------

def prepared_loader(**config: Any) -> DataLoader:  # type: ignore[type-arg]
    worker.build()  # a fresh Accelerator state
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**config))
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.arange(20.0)), batch_size=2, shuffle=True)
    prepared: DataLoader = accelerator.prepare(loader)  # type: ignore[type-arg]
    return prepared


def test_prepared_loader_in_a_checkpoint_manager_resumes_at_the_next_batch(tmp_path: Path) -> None:
    """Was: AttributeError: 'DataLoader' object has no attribute 'dl_state_dict' at the first save."""
    loader = prepared_loader()
    with unbroken.CheckpointManager(tmp_path / "run", {"loader": loader}) as ckpt:
        batches = iter(loader)
        seen = [next(batches)[0].tolist() for _ in range(3)]
        ckpt.save(3)
        rest = [b[0].tolist() for b in batches] + [b[0].tolist() for b in loader]  # and all of epoch 1
    assert len(seen) + len(rest) == 20
    loader = prepared_loader()
    with unbroken.CheckpointManager(tmp_path / "run", {"loader": loader}) as ckpt:
        assert ckpt.restore() == 3
        resumed = [b[0].tolist() for b in loader] + [b[0].tolist() for b in loader]
    assert resumed == rest


@pytest.mark.parametrize("stop_at", [4, 10, 13])  # mid-epoch 0, right after epoch 0's last batch, mid-epoch 1
def test_an_epoch_loop_from_loader_iteration_continues_at_the_saved_batch(tmp_path: Path, stop_at: int) -> None:
    """``for epoch in range(loader.iteration, epochs)``: a restore sets the prepared loader's epoch counter."""
    def run(stop: int | None) -> list[tuple[int, list[float]]]:
        loader, seen = prepared_loader(), []
        with unbroken.CheckpointManager(tmp_path / "run", {"loader": loader}, save_on_close=False) as ckpt:
            n = ckpt.restore()
            for epoch in range(loader.iteration, 3):
                for (batch,) in loader:
                    n += 1
                    seen.append((epoch, batch.tolist()))
                    if n == stop:
                        ckpt.save(n)
                        return seen
        return seen

    reference = run(None)
    shutil.rmtree(tmp_path / "run")
    assert run(stop_at) + run(None) == reference


def test_dispatching_loader_is_refused_when_the_manager_is_built(tmp_path: Path) -> None:
    loader = prepared_loader(dispatch_batches=True)
    with pytest.raises(unbroken.UnserializableStateError, match="dispatch_batches=False"):
        unbroken.CheckpointManager(tmp_path / "run", {"loader": loader})


def test_make_resumable_keeps_the_order_of_a_batch_samplers_own_sampler() -> None:
    """A loader built with batch_sampler=BatchSampler(RandomSampler) (what accelerator.prepare builds)
    stays shuffled; its .sampler is an unused SequentialSampler."""
    data = TensorDataset(torch.arange(64.0))
    loader = DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), 8, False))
    order = [v for (batch,) in unbroken.make_resumable(loader) for v in batch.tolist()]
    assert sorted(order) == list(range(64)) and order != list(range(64))


def test_checkpointing_refuses_what_is_not_an_accelerator(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Accelerator first"):
        worker.Checkpointing(tmp_path, "run")  # type: ignore[arg-type]


def test_importing_without_accelerate_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.delitem(sys.modules, "unbroken.integrations.accelerate", raising=False)
    with pytest.raises(ImportError, match=r'pip install "unbroken\[accelerate\]"'):
        importlib.import_module("unbroken.integrations.accelerate")


def test_a_new_machine_resumes_from_the_mirror(reference: Result, tmp_path: Path) -> None:
    run, mirror = tmp_path / "run", tmp_path / "mirror"
    worker.train(run, max_steps=7, mirror_to=str(mirror))
    shutil.rmtree(run)
    resumed = worker.train(run, mirror_to=str(mirror))
    assert_same(resumed, reference, range(8, STEPS + 1))


@pytest.mark.slow  # ~35 s on 2 cores (three 2-rank launches): run with -m slow
@pytest.mark.timeout(600)
def test_ddp_two_ranks_sigkill_mid_epoch_resume_is_bit_exact(tmp_path: Path) -> None:
    """Accelerate's MULTI_CPU data parallel (gloo, 2 ranks, BatchSamplerShard): both ranks SIGKILLed at
    step 8, the same command again, compared with an uninterrupted 2-rank run, rank by rank."""
    from tests.distributed.harness import launch, run_ok, wait_all

    def args(name: str) -> list[object]:
        return ["--run-dir", tmp_path / name, "--out", tmp_path / f"{name}-out"]

    run_ok(WORKER, args("reference"), 2, tmp_path / "logs-reference", timeout=300)
    killed = launch(WORKER, args("run"), 2, tmp_path / "logs-killed", env={"KILL_AT": str(KILL_AT)})
    assert wait_all(killed, 300) == [-signal.SIGKILL, -signal.SIGKILL]
    run_ok(WORKER, args("run"), 2, tmp_path / "logs-resumed", timeout=300, env={"KILL_AT": str(KILL_AT)})
    for rank in (0, 1):
        out, ref_out = tmp_path / "run-out", tmp_path / "reference-out"
        recorded = [tuple(json.loads(line)) for line in (out / f"losses.rank{rank}.jsonl").read_text().splitlines()]
        ref_losses = dict(tuple(json.loads(line)) for line in
                          (ref_out / f"losses.rank{rank}.jsonl").read_text().splitlines())
        assert [s for s, _ in recorded][KILL_AT] in (4, 7)  # resumed after checkpoint 3 or 6
        assert [loss == ref_losses[step] for step, loss in recorded] == [True] * len(recorded)
        assert (out / f"final.rank{rank}.json").read_text() == (ref_out / f"final.rank{rank}.json").read_text()
        result, ref = (load_file(str(d / f"final.rank{rank}.safetensors")) for d in (out, ref_out))
        assert result.keys() == ref.keys() and all(torch.equal(result[k], ref[k]) for k in ref)
