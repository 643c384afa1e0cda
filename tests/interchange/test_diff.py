"""``unbroken diff`` and ``unbroken.diff``: what differs between two checkpoints, with ``diff``'s exit
status (0 identical, 1 different, 2 error).  Checkpoints are written in-process with ``unbroken.save``."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import unbroken
from unbroken.cli.main import main
from unbroken.format import Manifest, ShardedTensor
from unbroken.format.manifest import ShardEntry
from unbroken.interchange import compare
from unbroken.interchange.diff_result import CheckpointDiff, EntryDiff
from unbroken.storage import step_name


def save(path: Path, state: dict[str, Any], **options: Any) -> Path:
    unbroken.save(path, state, rng=False, **options)
    return path


def weights(**changes: float) -> dict[str, Any]:
    w = torch.arange(1.0, 7.0).reshape(2, 3)
    for index, value in changes.items():
        w.view(-1)[int(index[1:])] = value
    return {"model": {"w": w, "b": torch.zeros(3)}, "epoch": 3}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def entry(result: CheckpointDiff, name: str) -> EntryDiff:
    return next(e for e in result.entries if e.name == name)


def test_identical_checkpoints_exit_0_and_are_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", weights(), metrics={"loss": 0.5}, metadata={"lr": 0.1})
    b = save(tmp_path / "b", weights(), metrics={"loss": 0.5}, metadata={"lr": 0.1})
    result = unbroken.diff(a, b)
    assert result.identical
    assert entry(result, "model").identical_tensors == ("model/w", "model/b")
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 0
    assert "model (value): identical (2 tensors)" in out
    assert out.splitlines()[-1] == "identical (bitwise): 2 tensors, 3 values"


def test_one_changed_tensor_exits_1_with_its_max_abs_and_max_rel(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", weights())
    b = save(tmp_path / "b", weights(i2=3.5))  # 3.0 -> 3.5
    model = entry(unbroken.diff(a, b), "model")
    assert model.identical_tensors == ("model/b",)
    (w,) = model.differing_tensors
    assert (w.name, w.dtype, w.shape, w.elements, w.differing) == ("model/w", "F32", (2, 3), 6, 1)
    assert w.max_abs == 0.5 and w.max_rel == 0.5 / 3.5  # relative to B's value
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 1
    assert "differ   model/w  F32[2, 3]: 1 of 6 elements, max abs 0.5, max rel 0.142857" in out
    assert out.splitlines()[-1] == "different (bitwise): 1 of 2 tensors differ"


def test_atol_tolerates_float_differences_within_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", weights(), metrics={"loss": 0.5})
    b = save(tmp_path / "b", weights(i2=3.5), metrics={"loss": 1.5})
    assert run_cli(capsys, "diff", "--atol", "0.5", a, b)[0] == 1  # the metric is 1.0 apart
    c = save(tmp_path / "c", weights(i2=3.5), metrics={"loss": 0.5})
    code, out, _ = run_cli(capsys, "diff", "--atol", "0.5", a, c)
    assert code == 0 and "identical (within atol 0.5)" in out
    assert run_cli(capsys, "diff", "--atol", "0.4", a, c)[0] == 1


def test_integer_and_bool_tensors_stay_exact_under_atol(tmp_path: Path) -> None:
    a = save(tmp_path / "a", {"x": {"i": torch.tensor([1, 2, 3]), "m": torch.tensor([True, False])}})
    b = save(tmp_path / "b", {"x": {"i": torch.tensor([1, 2, 4]), "m": torch.tensor([True, True])}})
    x = entry(unbroken.diff(a, b, atol=10.0), "x")
    assert [(t.name, t.differing, t.max_abs, t.max_rel) for t in x.differing_tensors] == [
        ("x/i", 1, 1.0, 0.25), ("x/m", 1, 1.0, 1.0)]


def test_exact_comparison_is_bitwise_negative_zero_differs_and_nan_equals_itself(tmp_path: Path) -> None:
    nan = torch.tensor([math.nan])
    a = save(tmp_path / "a", {"x": {"zero": torch.tensor([0.0]), "nan": nan, "one": torch.tensor([1.0])}})
    b = save(tmp_path / "b", {"x": {"zero": torch.tensor([-0.0]), "nan": nan.clone(), "one": nan.clone()}})
    x = entry(unbroken.diff(a, b), "x")
    assert x.identical_tensors == ("x/nan",)
    zero, one = x.differing_tensors
    assert (zero.name, zero.differing, zero.max_abs, zero.max_rel) == ("x/zero", 1, 0.0, 0.0)
    assert one.name == "x/one" and one.max_abs is not None and math.isnan(one.max_abs)
    tolerant = entry(unbroken.diff(a, b, atol=1e-9), "x")  # -0.0 == 0.0 within any atol; NaN vs 1.0 never
    assert tolerant.identical_tensors == ("x/zero", "x/nan") and [t.name for t in tolerant.differing_tensors] == [
        "x/one"]


def test_a_large_tensor_is_compared_in_chunks_without_losing_the_maximum(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare, "_CHUNK", 7)
    x = torch.arange(100.0)
    y = x.clone()
    y[3], y[50], y[98] = 4.0, 48.0, math.inf  # 1 apart, 2 apart, infinitely apart
    result = compare.compare_tensors(x, y)
    assert (result.differing, result.max_abs, result.max_rel) == (3, math.inf, math.inf)
    y[98] = 98.0
    y[10] = math.nan  # a NaN in an early chunk is not hidden by later ones
    result = compare.compare_tensors(x, y)
    assert result.differing == 3 and result.max_abs is not None and math.isnan(result.max_abs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.complex64, torch.complex128, torch.int8, torch.uint8,
                                   torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64, torch.uint64])
def test_every_dtype_reports_its_differences(dtype: torch.dtype) -> None:
    a = torch.tensor([1, 2, 3, 0], dtype=torch.int32).to(dtype)
    b = torch.tensor([1, 2, 5, 0], dtype=torch.int32).to(dtype)
    assert compare.compare_tensors(a, a.clone()) == compare.Comparison(4, 0, 0.0, 0.0)
    assert compare.compare_tensors(a, b) == compare.Comparison(4, 1, 2.0, 2.0 / 5.0)
    exact = not (a.is_floating_point() or a.is_complex())
    assert compare.compare_tensors(a, b, atol=2.0).differing == (1 if exact else 0)


def test_unequal_integers_beyond_float64_precision_are_never_zero_apart() -> None:
    result = compare.compare_tensors(torch.tensor([2**60]), torch.tensor([2**60 + 1]))
    assert (result.differing, result.max_abs) == (1, 1.0)


def test_missing_tensors_and_entries_are_reported_on_their_side(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", {"model": {"w": torch.ones(2), "extra": torch.ones(1)}, "ema": {"w": torch.ones(2)}})
    b = save(tmp_path / "b", {"model": {"w": torch.ones(2), "new": torch.ones(1)}, "epoch": 1})
    result = unbroken.diff(a, b)
    model = entry(result, "model")
    assert (model.only_a, model.only_b, model.identical_tensors) == (("model/extra",), ("model/new",), ("model/w",))
    assert (result.only_a, result.only_b) == (("ema",), ("epoch",))
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 1
    for line in ("  only A   model/extra", "  only B   model/new", "ema: only in A", "epoch: only in B"):
        assert line in out


def test_shape_and_dtype_changes_are_reported_and_not_compared(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", {"model": {"w": torch.ones(2, 3), "h": torch.ones(4), "v": torch.ones(2)}})
    b = save(tmp_path / "b", {"model": {"w": torch.ones(3, 2), "h": torch.ones(4, dtype=torch.bfloat16),
                                        "v": [1.0, 1.0]}})
    model = entry(unbroken.diff(a, b), "model")
    assert [(c.name, c.a, c.b) for c in model.changed] == [
        ("model/w", "F32[2, 3]", "F32[3, 2]"), ("model/h", "F32[4]", "BF16[4]"), ("model/v", "tensor F32[2]", "list")]
    assert not model.differing_tensors
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 1 and "  changed  model/h: F32[4] -> BF16[4]" in out
    assert out.splitlines()[-1] == "different (bitwise): 0 of 0 tensors differ, 3 changed dtype, shape or kind"


def test_plain_values_metrics_and_metadata_differences_are_reported(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", {"epoch": 3, "args": {"lr": 0.1, "name": "x", "steps": 1}},
             metrics={"loss": 0.5, "acc": 1}, metadata={"config": {"seed": 1}, "note": "a"})
    b = save(tmp_path / "b", {"epoch": 4, "args": {"lr": 0.1, "name": "y", "steps": 1.0}}, metrics={"loss": 0.25},
             metadata={"config": {"seed": 2}, "note": "a"})
    result = unbroken.diff(a, b)
    values = {v.name: (v.a, v.b) for e in (*result.entries, result.metrics, result.metadata) for v in e.values}
    assert values == {"epoch": (3, 4), "args/name": ("x", "y"), "args/steps": (1, 1.0),  # 1 and 1.0 differ
                      "metrics/loss": (0.5, 0.25), "metadata/config/seed": (1, 2)}
    assert result.metrics.only_a == ("metrics/acc",)
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 1
    for line in ("  value    epoch: 3 -> 4", "  value    args/name: 'x' -> 'y'", "  value    metrics/loss: 0.5 -> 0.25",
                 "  only A   metrics/acc", "  value    metadata/config/seed: 1 -> 2"):
        assert line in out


def test_runs_compare_their_newest_checkpoint_or_the_steps_given(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for step in (1, 2):
        save(tmp_path / "run" / step_name(step), weights(i0=float(step)), step=step)
    save(tmp_path / "other" / step_name(2), weights(i0=2.0), step=2)
    newest = unbroken.diff(tmp_path / "run", tmp_path / "other")
    assert newest.identical and (newest.a.step, newest.b.step) == (2, 2)
    code, out, _ = run_cli(capsys, "diff", tmp_path / "run", tmp_path / "other", "--step-a", "1")
    assert code == 1
    assert "checkpoint step: 1 -> 2" in out and "differ   model/w" in out
    assert run_cli(capsys, "diff", tmp_path / "run", tmp_path / "run", "--step-a", "2", "--step-b", "2")[0] == 0
    code, _, err = run_cli(capsys, "diff", tmp_path / "run", tmp_path / "other", "--step-a", "7")
    assert code == 2 and f"{tmp_path / 'run'}: no step 7 (steps there: 1, 2)" in err


def test_urls_compare_like_local_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = f"memory://unbroken-diff-{uuid.uuid4().hex}/run"
    for step in (1, 2):
        unbroken.save(f"{run}/{step_name(step)}", weights(i0=float(step)), step=step, rng=False)
    local = save(tmp_path / "local", weights(i0=2.0), step=2)
    assert unbroken.diff(run, local).identical  # the run's newest step
    code, out, _ = run_cli(capsys, "diff", run, f"{run}/{step_name(2)}", "--step-a", "1")
    assert code == 1 and f"A: {run}/{step_name(1)}  (step 1)" in out
    code, _, err = run_cli(capsys, "diff", f"{run}/{step_name(3)}", local)
    assert code == 2 and f"{run}/{step_name(3)}" in err


def test_json_output_is_one_strict_document_with_the_documented_shape(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", {"x": {"t": torch.tensor([1.0, 2.0])}, "epoch": 3}, metrics={"loss": 0.5})
    b = save(tmp_path / "b", {"x": {"t": torch.tensor([1.0, math.nan])}, "epoch": math.inf}, metrics={"loss": 0.5},
             step=4)
    code, out, _ = run_cli(capsys, "diff", "--json", a, b)
    assert code == 1
    doc = json.loads(out, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    assert set(doc) == {"identical", "atol", "a", "b", "checkpoint", "entries", "only_a", "only_b", "metrics",
                        "metadata", "counts"}
    assert doc["identical"] is False and doc["atol"] == 0.0
    assert doc["a"] == {"path": str(a), "step": 0, "world_size": 1}
    assert doc["checkpoint"] == [{"name": "step", "a": 0, "b": 4}]
    x, epoch = doc["entries"]
    assert x["differing_tensors"] == [{"name": "x/t", "dtype": "F32", "shape": [2], "elements": 2, "differing": 1,
                                       "max_abs": "nan", "max_rel": "nan"}]
    assert epoch["values"] == [{"name": "epoch", "a": 3, "b": "inf"}]
    assert doc["metrics"]["equal_values"] == 1 and doc["metrics"]["identical"] is True
    assert doc["counts"] == {"identical_tensors": 0, "differing_tensors": 1, "changed": 0, "differing_values": 2,
                             "equal_values": 1, "only_a": 0, "only_b": 0}
    assert unbroken.diff(a, b).to_json() == doc


def test_errors_exit_2_with_a_message_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", weights())
    code, out, err = run_cli(capsys, "diff", a, tmp_path / "nope")
    assert code == 2 and out == "" and f"{tmp_path / 'nope'}: no such path" in err
    b = save(tmp_path / "b", weights())
    data = b / "rank00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of the last tensor
    data.write_bytes(bytes(raw))
    code, _, err = run_cli(capsys, "diff", a, b)
    assert code == 2 and str(data) in err and "checksum mismatch" in err
    code, _, err = run_cli(capsys, "diff", "--atol", "-1", a, a)
    assert code == 2 and "atol=-1.0" in err


def test_a_checkpoint_saved_by_several_ranks_compares_its_logical_state(tmp_path: Path) -> None:
    """Sharded tensors are assembled whole from their pieces before comparing; each rank's own
    entries are compared as ``NAME (rank R)``."""
    plain = save(tmp_path / "plain", weights())

    def two_ranks(path: Path, second_half: torch.Tensor) -> Path:
        w = weights()["model"]["w"]
        save(path, {"model": {"b": torch.zeros(3)}, "pieces": {"0": w[:1].clone(), "1": second_half}})
        manifest = Manifest.from_json((path / "manifest.json").read_bytes(), str(path))
        shards = (ShardEntry("pieces/0", (0, 0), (1, 3)), ShardEntry("pieces/1", (1, 0), (1, 3)))
        manifest.sharded["model/w#sharded"] = ShardedTensor("F32", (2, 3), shards)
        manifest.state = {"model": {"kind": "value", "value": {"w": {"__tensor__": "model/w#sharded"},
                                                              "b": manifest.state["model"]["value"]["b"]}}}
        manifest.world_size, manifest.rank_state = 2, [{"epoch": {"kind": "value", "value": 3}},
                                                       {"epoch": {"kind": "value", "value": 3}}]
        (path / "manifest.json").write_bytes(manifest.to_json())
        return path

    same = two_ranks(tmp_path / "same", torch.tensor([[4.0, 5.0, 6.0]]))
    result = unbroken.diff(plain, same)
    assert entry(result, "model").identical  # the model is whole again: w's rows come from two pieces
    assert [v.name for v in result.checkpoint] == ["world_size"]
    assert (result.only_a, result.only_b) == (("epoch",), ("epoch (rank 0)", "epoch (rank 1)"))
    other = two_ranks(tmp_path / "other", torch.tensor([[4.0, 5.0, 6.5]]))
    result = unbroken.diff(same, other)
    (w,) = entry(result, "model").differing_tensors
    assert (w.name, w.differing, w.max_abs) == ("model/w", 1, 0.5)
    assert entry(result, "epoch (rank 1)").identical and not result.checkpoint


def test_the_result_type_is_public(tmp_path: Path) -> None:
    result = unbroken.diff(save(tmp_path / "a", weights()), save(tmp_path / "b", weights()))
    assert isinstance(result, unbroken.CheckpointDiff) and "CheckpointDiff" in unbroken.__all__
