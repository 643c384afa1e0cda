"""The unbroken command line: as a real subprocess, and in-process through ``main()`` where no process
boundary is under test (cheaper)."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import unbroken
from tests.helpers import reseal
from unbroken.cli.main import main


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
    assert "loss=0.1" in lines[1] and "unverified" in lines[1]  # only the manifests were read
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


# ---------------------------------------------------------------------------------------------
# bad checkpoints: every failure is one line and exit 1; what can be shown is shown
# ---------------------------------------------------------------------------------------------

def _checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / f"step_{step:09d}"
    unbroken.save(path, {"model": nn.Linear(2, 2), "epoch": 3}, step=step, metrics={"loss": 0.5}, rng=False)
    return path


def _edited(path: Path, edit: Callable[[bytes], bytes]) -> Path:
    """``path``'s manifest edited by ``edit`` and resealed (its own checksum recomputed, as an attacker could)."""
    manifest = path / "manifest.json"
    raw = manifest.read_bytes()
    edited = reseal(edit(raw))
    assert edited != raw, "the edit must change the manifest"
    manifest.write_bytes(edited)
    return path


def _cli_in_process(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_show_prints_an_impossible_creation_time_as_the_number_it_is(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = _edited(_checkpoint(tmp_path, 1), lambda raw: re.sub(rb'"created":[0-9.e+]+', b'"created":1e300', raw))
    code, out, err = _cli_in_process(capsys, "show", path)  # OverflowError from datetime before
    assert (code, err) == (0, "")
    assert "step 1, created 1e+300 (not a valid time)" in out and "model  (module, 2 tensors" in out
    code, out, err = _cli_in_process(capsys, "ls", tmp_path)
    assert code == 0 and "unverified" in out, out


def test_show_escapes_state_keys_that_are_not_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A lone surrogate is valid in JSON ("\udc80") but cannot be encoded to any terminal.
    path = _edited(_checkpoint(tmp_path, 1), lambda raw: raw.replace(b'"epoch":{', b'"\\udc80":{')
                   .replace(b'"loss":', b'"lo\\udc81ss":'))
    code, out, err = _cli_in_process(capsys, "show", path)  # UnicodeEncodeError before
    assert (code, err) == (0, "")
    assert "\\udc80  (value, 0 tensors, 0 B)" in out and "lo\\udc81ss=0.5" in out
    code, out, err = _cli_in_process(capsys, "ls", tmp_path)
    assert code == 0 and "lo\\udc81ss=0.5" in out


def test_numbers_no_float_or_text_can_hold_are_shown_as_what_they_are(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _checkpoint(tmp_path, 1)
    big, n = 7 ** 6000, 3 ** 10000  # more digits than Python turns into text (4300)
    unbroken.save(tmp_path / "step_000000002", {"big": big}, step=2, metrics={"n": n}, rng=False)
    _edited(path, lambda raw: re.sub(rb'("size":)[0-9]+', rb"\g<1>" + b"9" * 400, raw))  # OverflowError before
    code, out, err = _cli_in_process(capsys, "show", path)
    assert (code, err) == (0, "") and "9" * 400 + " B in 1 file(s)" in out
    code, out, err = _cli_in_process(capsys, "show", tmp_path / "step_000000002", "--values")
    assert (code, err) == (0, "")  # ValueError (int too long to print) before
    assert f"n=<int of {n.bit_length()} bits>" in out and f"<int of {big.bit_length()} bits>" in out
    code, out, err = _cli_in_process(capsys, "ls", tmp_path)
    assert (code, err) == (0, "") and "9" * 400 + " B" in out and f"n=<int of {n.bit_length()} bits>" in out
    code, out, err = _cli_in_process(capsys, "ls", tmp_path, "--json")
    assert (code, err) == (0, "") and json.loads(out)[1]["metrics"] == {"n": f"<int of {n.bit_length()} bits>"}


def test_every_failure_to_read_a_checkpoint_is_one_line_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = _checkpoint(tmp_path, 1)

    def disk_error(*_args: object, **_kwargs: object) -> None:  # what a failing disk or mount gives
        raise OSError(errno.EIO, "Input/output error", str(path / "manifest.json"))

    monkeypatch.setattr(unbroken, "read_info", disk_error)
    monkeypatch.setattr(unbroken, "verify", disk_error)
    code, out, err = _cli_in_process(capsys, "show", path)  # a traceback before
    assert (code, out) == (1, "") and len(err.splitlines()) == 1
    assert err.startswith("error: OSError: [Errno 5] Input/output error: ") and "manifest.json" in err
    code, out, err = _cli_in_process(capsys, "verify", tmp_path)  # not corrupt, but not valid either
    assert (code, err) == (1, "") and f"UNREADABLE  {path}: OSError: [Errno 5]" in out
    assert "0 valid, 0 corrupt, 1 unreadable" in out
    monkeypatch.undo()

    (path / "manifest.json").unlink()
    (path / "manifest.json").mkdir()
    code, out, err = _cli_in_process(capsys, "show", path)
    assert (code, out) == (1, "") and err.startswith("error: ") and len(err.splitlines()) == 1
    code, out, err = _cli_in_process(capsys, "ls", tmp_path)
    assert code == 1 and re.search(r"\bNO$", out, re.M) and err.startswith("step 1: ") and len(err.splitlines()) == 1


def test_plain_ls_says_unverified_until_verify_has_read_every_byte(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    good = _checkpoint(tmp_path, 1)
    truncated = _checkpoint(tmp_path, 2)
    data = truncated / "rank00000.safetensors"
    data.write_bytes(data.read_bytes()[:-8])
    _edited(_checkpoint(tmp_path, 3), lambda raw: raw.replace(b'"world_size":1', b'"world_size":-1'))

    def statuses(*flags: str) -> tuple[int, list[str]]:
        code, out, _ = _cli_in_process(capsys, "ls", tmp_path, *flags)
        return code, [re.findall(r"\b(yes|unverified|NO)\b", line)[0] for line in out.splitlines()[1:]]

    assert statuses() == (1, ["unverified", "unverified", "NO"])  # "yes" for the truncated one before
    assert statuses("--verify") == (1, ["yes", "NO", "NO"])
    shutil.rmtree(truncated)
    shutil.rmtree(tmp_path / "step_000000003")
    assert statuses() == (0, ["unverified"])
    code, out, _ = _cli_in_process(capsys, "ls", tmp_path, "--json")
    assert code == 0 and json.loads(out)[0]["path"].endswith(good.name) and json.loads(out)[0]["verified"] is False
    code, out, _ = _cli_in_process(capsys, "ls", tmp_path, "--json", "--verify")
    assert json.loads(out)[0]["verified"] is True
