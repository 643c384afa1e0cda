"""Export for inference from a single-process run: ``read_state_dict``, ``export`` (one file, shards,
casts), ``load(..., only=True)`` and ``unbroken export``."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import unbroken
from tests.helpers import make_ema, make_mlp, train
from unbroken.cli.main import main
from unbroken.cli.units import format_size
from unbroken.format import Manifest
from unbroken.storage import step_name


def trained() -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    model = make_mlp(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt)
    ema = make_ema(model, updates=3)  # the average now differs from the model
    return model, opt, ema


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module, nn.Module]:
    """A run whose newest checkpoint (step 20) holds a model, its optimizer, an EMA and plain values."""
    model, opt, ema = trained()
    run = tmp_path / "run"
    unbroken.save(run / step_name(10), {"model": make_mlp(seed=5), "epoch": 0}, step=10)
    unbroken.save(run / step_name(20), {"model": model, "optimizer": opt, "ema": ema, "epoch": 2,
                                        "weights": {"w": torch.arange(4.0)}}, step=20)
    return run, model, ema


def outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.linspace(-2, 2, 24).reshape(6, 4))


def loaded(path: Path | str, seed: int = 9) -> nn.Module:
    fresh = make_mlp(seed=seed)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    return fresh


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)  # a safetensors file lists its tensors sorted
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_exported_model_loads_strictly_and_computes_bit_for_bit_what_the_saved_model_did(
        saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, model, _ = saved
    result = unbroken.export(run, tmp_path / "out" / "model.safetensors")
    assert isinstance(result, unbroken.ExportResult) and "ExportResult" in unbroken.__all__
    assert result.paths == (str(tmp_path / "out" / "model.safetensors"),) and result.index is None
    assert (result.step, result.tensors) == (20, len(model.state_dict()))
    assert result.bytes == sum(t.nbytes for t in model.state_dict().values())
    assert_same_tensors(load_file(result.paths[0]), model.state_dict())
    assert torch.equal(outputs(loaded(result.paths[0])), outputs(model))


def test_export_metadata_records_the_source_step_checkpoint_and_entry(
        saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, _, _ = saved
    result = unbroken.export(run, str(tmp_path / "out") + "/", entry="ema")
    assert result.paths == (str(tmp_path / "out" / "model.safetensors"),)
    with safe_open(result.paths[0], "pt") as f:
        assert f.metadata() == {"format": "pt", "unbroken.step": "20", "unbroken.entry": "ema",
                                "unbroken.checkpoint": str(run / step_name(20))}


def test_export_reports_every_byte_of_every_file_it_writes(saved: tuple[Path, nn.Module, nn.Module],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _, _ = saved
    monkeypatch.setattr("unbroken.interchange.export._PROGRESS_BATCH", 64)  # several batches per shard
    calls: list[tuple[str, int]] = []
    steps: dict[str, list[int]] = {}

    def progress(name: str, total: int) -> Any:
        calls.append((name, total))
        steps[name] = []
        return steps[name].append

    result = unbroken.export(run, tmp_path / "out", dtype="bfloat16", max_shard_size=100, progress=progress)
    shards = [os.path.basename(p) for p in result.paths if p != result.index]
    assert [name for name, _ in calls] == shards and len(shards) > 1
    assert all(sum(steps[name]) == total for name, total in calls)
    assert max(len(done) for done in steps.values()) > 1  # a shard's bytes move as its batches are read
    assert sum(total for _, total in calls) == result.bytes
    assert unbroken.export(run, tmp_path / "again", progress=lambda name, total: None).bytes > 0  # no callback


def test_ema_export_equals_the_ema_module(saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, model, ema = saved
    whole = unbroken.export(run, tmp_path / "ema.safetensors", entry="ema")
    fresh_ema = make_ema(make_mlp(seed=9))
    fresh_ema.load_state_dict(load_file(whole.paths[0]), strict=True)  # AveragedModel: module.* and n_averaged
    assert_same_tensors(fresh_ema.state_dict(), ema.state_dict())
    inner = unbroken.export(run, tmp_path / "ema_module.safetensors", entry="ema.module")  # the averaged model
    assert torch.equal(outputs(loaded(inner.paths[0])), outputs(ema.module))
    assert not torch.equal(outputs(ema.module), outputs(model))


def test_bf16_export_equals_each_tensor_cast_and_leaves_integer_buffers_alone(
        saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, model, _ = saved
    result = unbroken.export(run, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    exported = load_file(result.paths[0])
    expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert_same_tensors(exported, expected)
    assert exported["1.num_batches_tracked"].dtype == torch.int64
    assert result.bytes == sum(t.nbytes for t in expected.values())
    state = unbroken.read_state_dict(run, dtype="bfloat16")
    assert list(state) == list(model.state_dict())  # in the module's order
    assert_same_tensors(state, expected)


def test_sharded_export_has_an_index_mapping_every_key_once_and_loads_back_equal(
        saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, model, _ = saved
    result = unbroken.export(run, tmp_path / "sharded", max_shard_size=100)  # a directory, created
    names = [os.path.basename(p) for p in result.paths]
    count = len(names) - 1
    assert count > 2 and names[-1] == "model.safetensors.index.json" and result.index == result.paths[-1]
    assert names[:-1] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads(Path(result.paths[-1]).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    assert list(index["weight_map"]) == list(model.state_dict())  # every key once, in order
    assert set(index["weight_map"].values()) == set(names[:-1])
    merged: dict[str, torch.Tensor] = {}
    for shard in result.paths[:-1]:
        tensors = load_file(shard)
        assert sum(t.nbytes for t in tensors.values()) <= 100 or len(tensors) == 1  # larger tensors alone
        assert all(index["weight_map"][k] == os.path.basename(shard) for k in tensors)
        merged.update(tensors)
    assert_same_tensors({k: merged[k] for k in model.state_dict()}, model.state_dict())
    from huggingface_hub import load_torch_model  # the Hub's loader of sharded checkpoints

    fresh = make_mlp(seed=9)
    load_torch_model(fresh, tmp_path / "sharded", strict=True)
    assert torch.equal(outputs(fresh), outputs(model))


def test_a_max_shard_size_the_export_fits_in_writes_one_plain_file(
        saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, _, _ = saved
    result = unbroken.export(run, tmp_path / "m.safetensors", max_shard_size="5GB")
    assert result.paths == (str(tmp_path / "m.safetensors"),)
    assert unbroken.interchange.export.parse_size("500MB") == 500 * 10**6
    assert unbroken.interchange.export.parse_size("4GiB") == 4 * 2**30


def test_read_state_dict_leaves_the_global_rng_untouched_and_warns_nothing(
        saved: tuple[Path, nn.Module, nn.Module]) -> None:
    run, model, _ = saved
    before = torch.random.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = unbroken.read_state_dict(run)
    assert caught == []
    assert torch.equal(torch.random.get_rng_state(), before)
    assert_same_tensors(state, model.state_dict())


def test_read_state_dict_takes_the_newest_checkpoint_or_the_step_asked_for(
        saved: tuple[Path, nn.Module, nn.Module]) -> None:
    run, model, _ = saved
    assert_same_tensors(unbroken.read_state_dict(run / step_name(20)), model.state_dict())
    assert_same_tensors(unbroken.read_state_dict(run, step=10), make_mlp(seed=5).state_dict())
    assert list(unbroken.read_state_dict(run, "weights")) == ["w"]
    assert list(unbroken.read_state_dict(run, "model.1")) == ["weight", "bias", "running_mean", "running_var",
                                                              "num_batches_tracked"]


def test_read_state_dict_skips_a_damaged_newest_checkpoint_with_a_warning(
        saved: tuple[Path, nn.Module, nn.Module]) -> None:
    run, _, _ = saved
    checkpoint = run / step_name(20)
    entry = Manifest.from_json((checkpoint / "manifest.json").read_bytes(), "test").tensors["model/0.weight"]
    raw = bytearray((checkpoint / entry.file).read_bytes())
    raw[entry.begin + 5] ^= 0xFF  # a byte of the model's weights: what is read
    (checkpoint / entry.file).write_bytes(bytes(raw))
    with pytest.warns(unbroken.CheckpointSkippedWarning, match="checksum mismatch"):
        state = unbroken.read_state_dict(run)
    assert_same_tensors(state, make_mlp(seed=5).state_dict())
    with pytest.raises(unbroken.CorruptCheckpointError, match="checksum mismatch"):
        unbroken.read_state_dict(run, step=20)  # a named step never falls back


def test_load_only_restores_just_the_given_entries_without_a_warning_and_keeps_the_rng(
        saved: tuple[Path, nn.Module, nn.Module]) -> None:
    run, model, _ = saved
    fresh = make_mlp(seed=9)
    before = torch.random.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = unbroken.load(run, {"model": fresh}, only=True)
    assert caught == [] and record.step == 20
    assert torch.equal(torch.random.get_rng_state(), before)
    assert_same_tensors(fresh.state_dict(), model.state_dict())
    missing = "'target_model': in the live state but not in the checkpoint"
    with pytest.raises(unbroken.StateMismatchError, match=missing):
        unbroken.load(run, {"target_model": make_mlp()}, only=True)  # what is given must be there


def test_a_missing_entry_is_refused_naming_the_entries_there(saved: tuple[Path, nn.Module, nn.Module],
                                                            tmp_path: Path) -> None:
    run, _, _ = saved
    with pytest.raises(ValueError, match=r"no state entry 'target_model'.*'ema', 'epoch', 'model', 'optimizer'"):
        unbroken.export(run, tmp_path / "x.safetensors", entry="target_model")
    with pytest.raises(ValueError, match="'optimizer' is not a state dict of tensors: 'state' is a dict"):
        unbroken.read_state_dict(run, "optimizer")
    with pytest.raises(ValueError, match="'epoch' is a value of type int, not a state dict"):
        unbroken.read_state_dict(run, "epoch")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_step_the_run_does_not_have_is_refused_naming_the_steps_it_has(
        saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, _, _ = saved
    with pytest.raises(unbroken.CheckpointNotFoundError, match=re.escape(f"{run}: no step 7 (steps there: 10, 20)")):
        unbroken.export(run, tmp_path / "x.safetensors", step=7)
    with pytest.raises(unbroken.CheckpointNotFoundError, match="checkpoint of step 20, not of step 10"):
        unbroken.read_state_dict(run / step_name(20), step=10)
    with pytest.raises(unbroken.CheckpointNotFoundError, match=re.escape(f"{tmp_path / 'nothing'}: no such path")):
        unbroken.read_state_dict(tmp_path / "nothing")


def test_an_existing_output_is_never_overwritten(saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, _, _ = saved
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="model.safetensors already exists; export never overwrites"):
        unbroken.export(run, out)
    with pytest.raises(FileExistsError, match="already exists"):
        unbroken.export(run, out, max_shard_size=100)  # shards beside an unrelated model.safetensors: refused too
    assert (out / "model.safetensors").read_bytes() == b"keep me"
    assert sorted(os.listdir(out)) == ["model.safetensors"]  # nothing written, no temporary left


def test_bad_options_are_refused_with_what_to_pass(saved: tuple[Path, nn.Module, nn.Module], tmp_path: Path) -> None:
    run, _, _ = saved
    with pytest.raises(ValueError, match="max_shard_size='5 parsecs'"):
        unbroken.export(run, tmp_path / "x.safetensors", max_shard_size="5 parsecs")
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        unbroken.export(run, tmp_path / "x.safetensors", dtype=torch.int8)
    with pytest.raises(ValueError, match="export writes to a local path"):
        unbroken.export(run, "s3://bucket/model.safetensors")


def test_cli_export_writes_the_file_and_says_what_it_wrote(saved: tuple[Path, nn.Module, nn.Module],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, model, _ = saved
    out = tmp_path / "cli" / "model.safetensors"
    assert main(["export", str(run), "-o", str(out), "--dtype", "float16", "--entry", "model"]) == 0
    printed = capsys.readouterr().out
    assert f"exported 'model' of step 20 from {run / step_name(20)}" in printed and str(out) in printed
    size = sum(t.numel() * 2 if t.is_floating_point() else t.nbytes for t in model.state_dict().values())
    assert f"{len(model.state_dict())} tensors, {format_size(size)}\n" in printed  # "0.0 MB" before
    assert load_file(str(out))["0.weight"].dtype == torch.float16
    assert main(["export", str(run), "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "s/"), "--max-shard-size", "100", "--step", "20"]) == 0
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert main(["export", str(run), "-o", str(tmp_path / "y.safetensors"), "--entry", "nope"]) == 2
    assert "no state entry 'nope'" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "z.safetensors"), "--storage-option", "novalue"]) == 2
    assert "--storage-option 'novalue': expected KEY=VALUE" in capsys.readouterr().err


def test_a_url_source_exports_like_a_local_one(tmp_path: Path) -> None:
    model = make_mlp(seed=2)
    url = f"memory://export-{tmp_path.name}/run"
    unbroken.save(f"{url}/{step_name(3)}", {"model": model}, step=3)
    assert_same_tensors(unbroken.read_state_dict(url), model.state_dict())
    result = unbroken.export(f"{url}/{step_name(3)}", tmp_path)
    assert result.checkpoint == f"{url}/{step_name(3)}"
    assert torch.equal(outputs(loaded(result.paths[0])), outputs(model))
