"""Other DTensor layouts: HSDP (a replicated mesh dimension: each piece stored once, by the rank at
coordinate 0 of it) and a column-sharded Shard(1) parameter, saved by 4 ranks, restored on 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unbroken.format import Manifest

from .harness import HERE, run_ok

WORKER = HERE / "dtensor_worker.py"


@pytest.mark.timeout(180)
def test_hsdp_and_column_sharded_state_of_4_ranks_restores_on_2(tmp_path: Path) -> None:
    run_ok(WORKER, ["save", tmp_path / "run", tmp_path / "a"], 4, tmp_path / "logs_a")
    manifest = Manifest.from_json((tmp_path / "run" / "step_000000002" / "manifest.json").read_bytes(), "t")
    weight = manifest.sharded["model/0.weight"]
    assert weight.placements == ("R", "S(0)") and weight.mesh == (2, 2)
    assert [(s.tensor.split("/")[0], s.offsets) for s in weight.shards] == [
        ("unbroken.shard00000", (0, 0)), ("unbroken.shard00001", (6, 0))]  # ranks 2 and 3 hold copies
    columns = manifest.sharded["columns/p"]
    assert [s.offsets for s in columns.shards] == [(0, 0), (0, 3), (0, 6), (0, 9)]
    run_ok(WORKER, ["restore", tmp_path / "run", tmp_path / "b"], 2, tmp_path / "logs_b")
    expected, restored = load_file(str(tmp_path / "a" / "expected.safetensors")), load_file(
        str(tmp_path / "b" / "restored.safetensors"))
    assert expected.keys() == restored.keys()
    for name in expected:
        assert torch.equal(expected[name], restored[name]), name
