"""Export from checkpoints saved by 2 real ranks: a DDP run (its tensors spread over both ranks'
files) and an FSDP2 run (every tensor stored as two pieces) each give one file that a freshly built
model loads strictly, computing bit for bit what the trained model computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

import unbroken
from tests.distributed.harness import run_ok
from unbroken.format import Manifest
from unbroken.storage import step_name

from .export_worker import ddp_model, fsdp_model

WORKER = Path(__file__).resolve().parent / "export_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ddp`` and ``fsdp`` runs saved at step 1 by 2 ranks, with the full state dicts they hold."""
    root = tmp_path_factory.mktemp("export2")
    run_ok(WORKER, [root], 2, root / "logs", timeout=180)
    ddp = Manifest.from_json((root / "ddp" / step_name(1) / "manifest.json").read_bytes(), "test")
    assert {e.file for k, e in ddp.tensors.items() if k.startswith("model/")} == {"rank00000.safetensors",
                                                                                   "rank00001.safetensors"}
    fsdp = Manifest.from_json((root / "fsdp" / step_name(1) / "manifest.json").read_bytes(), "test")
    assert [s.shape for s in fsdp.sharded["model/0.weight"].shards] == [(7, 8), (6, 8)]
    return root


def expected(root: Path, which: str, entry: str) -> dict[str, torch.Tensor]:
    dump = load_file(str(root / f"{which}_expected.safetensors"))
    return {k[len(entry) + 1:]: v for k, v in dump.items() if k.startswith(entry + "/")}


def outputs(model: nn.Module, inputs: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.linspace(-3, 3, 5 * inputs).reshape(5, inputs))


def strictly_loaded(model: nn.Module, path: str) -> nn.Module:
    model.load_state_dict(load_file(path), strict=True)
    return model


def reference(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.timeout(240)
def test_export_of_a_2_rank_ddp_run_loads_strictly_and_computes_bit_for_bit(runs: Path, tmp_path: Path) -> None:
    result = unbroken.export(runs / "ddp", tmp_path / "model.safetensors")
    state = expected(runs, "ddp", "model")
    exported = load_file(result.paths[0])
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], v) for k, v in state.items())
    model = strictly_loaded(ddp_model(), result.paths[0])
    assert torch.equal(outputs(model, 6), outputs(reference(ddp_model(), state), 6))


@pytest.mark.timeout(240)
def test_ema_export_of_a_2_rank_ddp_run_equals_the_ema_module(runs: Path, tmp_path: Path) -> None:
    state = expected(runs, "ddp", "ema")
    result = unbroken.export(runs / "ddp", tmp_path / "ema.safetensors", entry="ema")
    ema = strictly_loaded(AveragedModel(ddp_model()), result.paths[0])
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in state.items())
    inner = unbroken.read_state_dict(runs / "ddp", "ema.module")
    model = ddp_model()
    model.load_state_dict(inner, strict=True)
    assert torch.equal(outputs(model, 6), outputs(reference(AveragedModel(ddp_model()), state).module, 6))


@pytest.mark.timeout(240)
def test_export_of_a_2_rank_fsdp2_run_assembles_every_piece_and_computes_bit_for_bit(runs: Path,
                                                                                      tmp_path: Path) -> None:
    state = expected(runs, "fsdp", "model")
    result = unbroken.export(runs / "fsdp", tmp_path / "fsdp.safetensors")
    exported = load_file(result.paths[0])
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], v) for k, v in state.items())
    model = strictly_loaded(fsdp_model(), result.paths[0])
    assert torch.equal(outputs(model, 8), outputs(reference(fsdp_model(), state), 8))
    sharded = unbroken.export(runs / "fsdp", tmp_path / "shards", max_shard_size=200)  # pieces across shards
    assert len(sharded.paths) > 2
    merged = {k: v for path in sharded.paths[:-1] for k, v in load_file(path).items()}
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], v) for k, v in state.items())


@pytest.mark.timeout(240)
def test_load_only_takes_the_model_of_a_2_rank_fsdp2_run_into_a_plain_model(runs: Path) -> None:
    model = fsdp_model()
    before = torch.random.get_rng_state()
    unbroken.load(runs / "fsdp", {"model": model}, only=True)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(outputs(model, 8), outputs(reference(fsdp_model(), expected(runs, "fsdp", "model")), 8))
