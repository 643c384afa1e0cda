"""The unbroken command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import unbroken


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unbroken.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = unbroken.CheckpointManager(tmp_path / "run", {"model": model, "optimizer": opt, "epoch": 1},
                                      every_steps=10, save_on_close=False)
    for step in range(1, 31):
        ckpt.step(step, metrics={"loss": 1.0 / step})
    ckpt.close()  # step 30's background save is committed before any command looks (it raced under load)
    return tmp_path / "run"


def test_ls_table_and_json(run: Path) -> None:
    out = cli("ls", run)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["STEP", "AGE", "SIZE", "VALID", "METRICS"]
    assert [line.split()[0] for line in lines[1:]] == ["10", "20", "30"]
    assert "loss=0.1" in lines[1] and "yes" in lines[1]
    records = json.loads(cli("ls", run, "--json").stdout)
    assert [r["step"] for r in records] == [10, 20, 30] and all(r["valid"] for r in records)


def test_show_prints_the_state_tree(run: Path) -> None:
    out = cli("show", run / "step_000000020")
    assert out.returncode == 0, out.stderr
    assert "step 20" in out.stdout
    assert "model  (module, 2 tensors, 60 B)" in out.stdout
    assert "weight: F32 [3, 4]  48 B" in out.stdout
    assert "momentum_buffer: F32 [3, 4]" in out.stdout
    assert "epoch  (value, 0 tensors, 0 B)" in out.stdout


def test_verify_ok_and_corrupt(run: Path) -> None:
    out = cli("verify", run)
    assert out.returncode == 0 and "3 valid, 0 corrupt" in out.stdout
    data = run / "step_000000020" / "rank00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    out = cli("verify", run)
    assert out.returncode == 1
    assert "CORRUPT" in out.stdout and "step_000000020" in out.stdout and "checksum mismatch" in out.stdout
    assert "2 valid, 1 corrupt" in out.stdout
    assert cli("verify", run / "step_000000020").returncode == 1
    assert cli("verify", run / "step_000000030").returncode == 0
    listed = cli("ls", run, "--verify")
    assert listed.returncode == 1 and "NO" in listed.stdout


def test_missing_paths_exit_2_with_a_message(tmp_path: Path) -> None:
    for command in ("ls", "show", "verify"):
        out = cli(command, tmp_path / "missing")
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "error:" in out.stderr and "missing" in out.stderr
        assert "Traceback" not in out.stderr


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("unbroken")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "verify" in out.stdout
