"""The command line starts without torch: ``--help``, ``run``, ``ls``, ``verify`` and ``show`` of a
local run read manifests and checksum bytes, and importing torch would cost them seconds.

Each check runs in a fresh interpreter, since this test process has imported torch already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import unbroken
from unbroken.storage import step_name

# Runs unbroken.cli.main.main(ARGV) and reports its exit status and whether torch got imported.
_CLI = """
import json, sys
from unbroken.cli.main import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = exc.code
print("RESULT " + json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def fresh(code: str, *args: str) -> tuple[dict[str, Any], str]:
    """Run ``code`` in a new interpreter; its ``RESULT`` line, and everything it printed before."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed, _, result = out.stdout.rpartition("RESULT ")
    return json.loads(result), printed + out.stderr


def cli(*argv: str) -> tuple[dict[str, Any], str]:
    return fresh(_CLI, json.dumps(list(argv)))


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A run directory with the checkpoints of steps 1 and 2."""
    for step in (1, 2):
        unbroken.save(tmp_path / "run" / step_name(step), {"w": torch.arange(1000.0) * step, "epoch": step},
                      step=step, metrics={"loss": 1.0 / step})
    return tmp_path / "run"


def test_import_unbroken_is_torch_free_until_the_manager_is_used() -> None:
    result, _ = fresh("import json, sys, unbroken\n"
                      "before = 'torch' in sys.modules\n"
                      "unbroken.CheckpointManager\n"
                      "print('RESULT ' + json.dumps({'before': before, 'after': 'torch' in sys.modules}))")
    assert result == {"before": False, "after": True}


def test_version_does_not_import_torch() -> None:
    result, printed = cli("--version")
    assert result == {"code": 0, "torch": False}
    assert printed == f"unbroken {unbroken.__version__}\n"


def test_run_help_does_not_import_torch() -> None:
    result, printed = cli("run", "--help")
    assert result == {"code": 0, "torch": False}
    assert "usage: unbroken run" in printed and "Exit status" in printed


def test_run_does_not_import_torch(run: Path) -> None:
    result, printed = cli("run", "--dir", str(run), "--max-restarts", "0", "--", sys.executable, "-c", "pass")
    assert result == {"code": 0, "torch": False}, printed


def test_ls_of_a_local_run_does_not_import_torch(run: Path) -> None:
    result, printed = cli("ls", str(run))
    assert result == {"code": 0, "torch": False}, printed
    rows = [line.split() for line in printed.splitlines()[1:]]
    assert [row[0] for row in rows] == ["1", "2"] and all("unverified" in row for row in rows)  # only manifests read
    result, printed = cli("ls", str(run), "--verify", "--json")
    assert result == {"code": 0, "torch": False}, printed
    assert [r["step"] for r in json.loads(printed)] == [1, 2]


def test_verify_does_not_import_torch(run: Path) -> None:
    result, printed = cli("verify", str(run / step_name(1)))
    assert result == {"code": 0, "torch": False}, printed
    assert "OK" in printed and "1 valid, 0 corrupt" in printed


def test_verify_of_a_corrupt_checkpoint_does_not_import_torch(run: Path) -> None:
    [data] = (run / step_name(2)).glob("*.safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    result, printed = cli("verify", str(run / step_name(2)))
    assert result == {"code": 1, "torch": False}, printed
    assert "CORRUPT" in printed and "checksum mismatch" in printed and "0 valid, 1 corrupt" in printed
    result, printed = cli("verify", str(run))
    assert result == {"code": 1, "torch": False}, printed
    assert "1 valid, 1 corrupt" in printed


def test_show_does_not_import_torch(run: Path) -> None:
    result, printed = cli("show", str(run / step_name(2)))
    assert result == {"code": 0, "torch": False}, printed
    # Sizes in decimal units (issue 16: one convention everywhere), "3.9 KB" in units of 1024 before.
    assert "step 2" in printed and "w  (value, 1 tensors, 4.0 kB)" in printed and "F32 [1000]  4.0 kB" in printed
