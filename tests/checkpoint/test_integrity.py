"""Damage to the newest checkpoint at random places: detected before use, named, and skipped.

Each case damages step 2 of a run that also holds step 1, chosen from a seed (replayable): a cut
at a random length, a flipped random bit, an empty/missing manifest, a missing tensor file, a
future format version.  Then ``restore()`` must fall back to step 1 with a warning naming the file,
load step 1's exact values, and ``unbroken verify`` must exit 1 naming the damaged file.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from tests import helpers
from tests.helpers import reseal, sealed_manifest
from unbroken import CheckpointManager, CheckpointSkippedWarning
from unbroken.cli.main import main as cli_main
from unbroken.format import FORMAT_VERSION

make_state = partial(helpers.make_state, sizes=(16, 32, 4), optimizer=torch.optim.Adam)

DATA = "rank00000.safetensors"
MANIFEST = "manifest.json"



@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("integrity") / "run"
    for step in (1, 2):
        state = make_state(step)
        ckpt = CheckpointManager(run, state, async_save=False)
        ckpt.save(step)
        ckpt.close()
    return run


def cut(rng: random.Random, file: Path) -> str:
    size = file.stat().st_size
    length = rng.randrange(size)
    with open(file, "r+b") as handle:
        handle.truncate(length)
    return f"cut to {length} of {size} bytes"


def flip(rng: random.Random, file: Path) -> str:
    data = bytearray(file.read_bytes())
    offset, bit = rng.randrange(len(data)), rng.randrange(8)
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))
    return f"bit {bit} of byte {offset} flipped"


def flip_data_area(rng: random.Random, file: Path) -> str:
    raw = file.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    data = bytearray(raw)
    offset = rng.randrange(8 + header, len(raw))
    data[offset] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))
    return f"tensor byte {offset} flipped"


def future_version(rng: random.Random, file: Path) -> str:
    doc = file.read_bytes()
    file.write_bytes(reseal(doc.replace(f'"format_version":"{FORMAT_VERSION}"'.encode(), b'"format_version":"2.0"')))
    return "format 2.0"


DAMAGE: dict[str, tuple[str, Callable[[random.Random, Path], str], str]] = {
    # name: (file damaged, how, what the message must say)
    "cut-data": (DATA, cut, DATA),
    "flip-data": (DATA, flip, DATA),
    "flip-tensor-bytes": (DATA, flip_data_area, "checksum"),
    "cut-manifest": (MANIFEST, cut, MANIFEST),
    "flip-manifest": (MANIFEST, flip, MANIFEST),
    "empty-manifest": (MANIFEST, lambda rng, f: (f.write_bytes(b""), "emptied")[1], "empty"),
    "no-manifest": (MANIFEST, lambda rng, f: (f.unlink(), "deleted")[1], MANIFEST),
    "no-data": (DATA, lambda rng, f: (f.unlink(), "deleted")[1], "missing"),
    "future-version": (MANIFEST, future_version, "upgrade unbroken"),
}
SEEDS = range(4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_skipped_and_the_previous_one_restored(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, seed: int) -> None:
    run = tmp_path / "run"
    shutil.copytree(template, run)
    file_name, damage, expected = DAMAGE[kind]
    rng = random.Random(f"{kind}-{seed}")
    how = damage(rng, run / "step_000000002" / file_name)
    assert cli_main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "step_000000002" in out and "1 valid, 1 corrupt" in out, out

    state = make_state(99)
    ckpt = CheckpointManager(run, state, async_save=False)
    with pytest.warns(CheckpointSkippedWarning) as warned:
        assert ckpt.restore() == 1, how
    ckpt.close()
    message = " ".join(str(w.message) for w in warned)
    assert "step_000000002" in message and expected in message, f"{how}: {message}"
    reference = make_state(1)
    for name, tensor in reference["model"].state_dict().items():
        assert torch.equal(state["model"].state_dict()[name], tensor), name
    assert state["epoch"] == 1
    # Quarantined: out of the step_* namespace, its bytes kept; a newer format is not corruption and stays.
    quarantined = sorted(p.name for p in run.glob("corrupt-step_000000002-*"))
    if kind == "future-version":
        assert not quarantined and (run / "step_000000002").is_dir()
    else:
        assert len(quarantined) == 1 and not (run / "step_000000002").exists(), quarantined
    assert cli_main(["verify", str(run)]) == (1 if kind == "future-version" else 0)


def test_an_intact_run_verifies(template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["verify", str(template)]) == 0
    assert "2 valid, 0 corrupt" in capsys.readouterr().out
    manifest = json.loads((template / "step_000000002" / MANIFEST).read_bytes())
    assert manifest["format_version"] == FORMAT_VERSION


def _declare_a_huge_sharded_tensor(manifest: Path) -> None:
    """Edit (and reseal) step 2's manifest to say that model/2.weight is a sharded [2**20, 2**20]
    tensor of 65 pieces (more than the loader compares pair by pair), all reusing one stored [4, 32]
    tensor: 4 TiB declared in a 12 KB checkpoint."""
    doc = json.loads(manifest.read_bytes())
    pieces = [{"tensor": "model/2.weight", "offsets": [4 * i, 0], "shape": [4, 32]} for i in range(65)]
    doc["sharded"] = {"huge": {"dtype": "F32", "shape": [2**20, 2**20], "placements": [], "mesh": [],
                               "shards": pieces}}
    doc["state"]["model"]["value"]["2.weight"] = {"__tensor__": "huge"}
    manifest.write_bytes(sealed_manifest(doc))


def test_a_sharded_tensor_declared_larger_than_its_pieces_is_corrupt_and_the_previous_step_restored(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes in a manifest are checked against the stored pieces before anything is allocated: verify
    calls the checkpoint corrupt, and restore() skips it instead of dying in the allocator."""
    run = tmp_path / "run"
    shutil.copytree(template, run)
    _declare_a_huge_sharded_tensor(run / "step_000000002" / MANIFEST)

    assert cli_main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "1 valid, 1 corrupt" in out and "do not cover it exactly once" in out, out

    state = make_state(99)
    ckpt = CheckpointManager(run, state, async_save=False)
    with pytest.warns(CheckpointSkippedWarning, match="step_000000002.*do not cover it exactly once"):
        assert ckpt.restore() == 1
    ckpt.close()
    assert torch.equal(state["model"].state_dict()["2.weight"], make_state(1)["model"].state_dict()["2.weight"])
