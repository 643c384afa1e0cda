"""The CLI as a good Unix tool (issue 16 item 4): run directories and checkpoints accepted where
either makes sense, messages that name the real problem, numbers that stay numbers, one unit
convention, progress only on a terminal, quiet exits into a closed pipe.  In-process through
``main()`` unless a process boundary is under test."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import unbroken
from tests.s3server import S3Run, S3Server
from unbroken.cli import progress
from unbroken.cli.main import main
from unbroken.cli.progress import ProgressBar, ProgressBars
from unbroken.cli.units import format_size


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sizes_are_decimal_si_everywhere() -> None:
    assert format_size(999) == "999 B"
    assert format_size(1000) == "1.0 kB"
    assert format_size(384_100_000) == "384.1 MB"
    assert format_size(402_800_000) == "402.8 MB"
    assert format_size(5 * 10**9) == "5.0 GB"
    assert format_size(10**400) == f"{10**400} B"  # more than a float holds: the bytes as they are


def test_progress_bar_draws_on_a_terminal_in_the_same_units() -> None:
    stream = _Terminal()
    with ProgressBar("step_1", total=2_000_000, stream=stream, delay=0) as bar:
        bar.update(1_000_000)
    drawn = stream.getvalue()
    assert "step_1" in drawn and "/2.00M " in drawn  # decimal: 2_000_000 B in 1024s would be 1.91M


def test_progress_bar_stays_silent_off_a_terminal_and_when_nothing_moves() -> None:
    not_a_tty = io.StringIO()
    with ProgressBar("step_1", total=10, stream=not_a_tty, delay=0) as bar:
        bar.update(10)
    assert not_a_tty.getvalue() == ""
    terminal = _Terminal()
    with ProgressBars(stream=terminal, delay=0) as bars:
        assert bars("step_1", 10) is not None  # a step already present: never advanced, never drawn
    assert terminal.getvalue() == ""
    with ProgressBars(stream=terminal, enabled=False, delay=0) as bars:
        assert bars("step_1", 10) is None


def test_progress_bar_waits_before_drawing_a_short_operation() -> None:
    stream = _Terminal()
    with ProgressBar("step_1", total=10, stream=stream, delay=3600.0) as bar:
        bar.update(10)
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------------------------------
# what a path names: show and ls take a run directory or a checkpoint; a missing path is said so
# ---------------------------------------------------------------------------------------------

def _save(run: Path, step: int, **metrics: float) -> Path:
    path = run / f"step_{step:09d}"
    unbroken.save(path, {"w": torch.ones(300_000) * step, "epoch": step}, step=step, metrics=metrics or None,
                  rng=False)
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """Steps 1 and 2 (1.2 MB each), and a step 3 whose manifest is damaged."""
    for step in (1, 2, 3):
        _save(tmp_path / "run", step, loss=1.0 / step)
    (tmp_path / "run" / "step_000000003" / "manifest.json").write_text("{")
    return tmp_path / "run"


def test_show_of_a_run_shows_its_newest_valid_checkpoint_or_the_step_asked_for(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "show", run)  # "not a checkpoint (no manifest.json)" before
    assert (code, err) == (0, "") and f"checkpoint {run / 'step_000000002'}" in out and "  step 2," in out
    code, out, err = _cli(capsys, "show", run, "--step", "1")
    assert (code, err) == (0, "") and "  step 1," in out
    code, out, err = _cli(capsys, "show", run, "--step", "7")
    assert (code, out) == (2, "") and f"{run}: no step 7 (steps there: 1, 2, 3)" in err


def test_show_says_no_such_path_and_what_a_directory_is_not(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "show", tmp_path / "nonexistent")
    assert (code, out) == (2, "") and err == f"error: {tmp_path / 'nonexistent'}: no such path\n"
    (tmp_path / "empty").mkdir()
    code, out, err = _cli(capsys, "show", tmp_path / "empty")
    assert (code, out) == (2, "")
    assert "neither a checkpoint (no manifest.json) nor a run directory with checkpoints" in err


def test_ls_of_a_checkpoint_describes_it_in_one_row(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "ls", run / "step_000000002")  # an empty table, exit 0 before
    assert (code, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()] == ["STEP", "2"] and "loss=0.5" in out
    code, out, _ = _cli(capsys, "ls", run / "step_000000002", "--json", "--verify")
    (record,) = json.loads(out)
    assert code == 0 and (record["step"], record["verified"], record["metrics"]) == (2, True, {"loss": 0.5})
    code, out, err = _cli(capsys, "ls", run / "step_000000003")
    assert code == 1 and "NO" in out and err.startswith("step 3: ")


def test_ls_and_verify_say_the_same_of_a_directory_without_checkpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    said = {command: _cli(capsys, command, tmp_path / "empty") for command in ("ls", "verify")}
    assert said["ls"] == said["verify"] == (1, "", f"no checkpoints in {tmp_path / 'empty'}\n")
    code, out, err = _cli(capsys, "ls", tmp_path / "empty", "--json")
    assert (code, json.loads(out), err) == (1, [], f"no checkpoints in {tmp_path / 'empty'}\n")
    for command in ("ls", "verify"):
        code, out, err = _cli(capsys, command, tmp_path / "nonexistent")
        assert (code, out, err) == (2, "", f"error: {tmp_path / 'nonexistent'}: no such path\n")


# ---------------------------------------------------------------------------------------------
# messages in the words of the command line
# ---------------------------------------------------------------------------------------------

def test_cp_of_a_missing_step_names_it_and_the_steps_there(run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "cp", run, tmp_path / "copy", "--step", "7")  # "no valid checkpoint to copy"
    assert (code, out) == (2, "") and f"{run}: no step 7 (steps there: 1, 2, 3)" in err
    assert not (tmp_path / "copy").exists()
    with pytest.raises(unbroken.CheckpointNotFoundError, match="no step 7"):
        unbroken.copy_checkpoints(run, tmp_path / "copy", step=7)
    with pytest.raises(unbroken.CorruptCheckpointError, match="step 3 is not valid"):
        unbroken.copy_checkpoints(run, tmp_path / "copy", step=3)


def test_prune_without_a_rule_names_the_flags_not_the_python_arguments(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "prune", run)
    assert (code, out) == (2, "") and "--keep-last" in err and "--invalid" in err and "keep_last" not in err
    code, out, err = _cli(capsys, "prune", run, "--keep-best", "1")
    assert code == 2 and "--keep-best needs --best-metric" in err and "best_metric" not in err
    with pytest.raises(ValueError, match="keep_last"):  # the library speaks Python to Python users
        unbroken.prune(run)


def _s3_flags(server: S3Server) -> list[str]:
    options = server.options()
    return ["-o", f"key={options['key']}", "-o", f"secret={options['secret']}",
            "-o", f"client_kwargs.endpoint_url={server.endpoint}", "-o", "client_kwargs.region_name=us-east-1",
            "-o", "config_kwargs.retries.max_attempts=1"]


def _read_advice(message: str) -> None:
    assert "a failed save" not in message and "earlier checkpoints" not in message  # save advice, for a read
    assert "credentials" in message and "endpoint" in message and "bucket" in message, message


def test_reading_a_missing_bucket_gives_read_advice(s3_server: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    s3_server.start()
    code, out, err = _cli(capsys, "ls", "s3://unbroken-no-such-bucket/run", *_s3_flags(s3_server))
    assert (code, out) == (2, "") and "the bucket 'unbroken-no-such-bucket' does not exist" in err
    _read_advice(err)


def test_an_unreachable_store_gives_read_advice_for_a_read(s3_run: S3Run, s3_server: S3Server,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    flags = _s3_flags(s3_server)
    s3_server.stop()
    code, out, err = _cli(capsys, "ls", s3_run.url, *flags)
    assert (code, out) == (1, "") and err.startswith(f"error: [Errno 5] list s3://{s3_run.bucket}")
    _read_advice(err)
    assert "retrying is safe" in err and s3_server.options()["secret"] not in err


def test_a_run_at_the_root_of_a_bucket_is_listed_verified_and_shown(s3_run: S3Run, s3_server: S3Server,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = f"s3://{s3_run.bucket}"  # no parent: it can only be a run, never a checkpoint
    unbroken.save(f"{root}/step_000000001", {"epoch": 1}, step=1, rng=False, storage_options=s3_run.storage_options)
    for command in ("ls", "verify", "show"):
        code, out, err = _cli(capsys, command, root, *_s3_flags(s3_server))
        assert (code, err) == (0, ""), (command, err)  # verify: "a checkpoint URL needs a parent" before
    assert "step 1," in out


# ---------------------------------------------------------------------------------------------
# output: pipes, JSON numbers, one unit convention, progress on a terminal
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["ls", "--json"], ["show"]])
def test_output_into_a_pipe_closed_early_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    # Far more output than a pipe buffers (64 KiB), so the writer meets the closed pipe for certain.
    unbroken.save(tmp_path / "run" / "step_000000001", {"cfg": {f"k{i}": i for i in range(20_000)}}, step=1,
                  metrics={f"m{i}": i / 7 for i in range(5_000)}, rng=False)
    writer = subprocess.Popen([sys.executable, "-m", "unbroken.cli", *command, str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    assert writer.stdout is not None and writer.stderr is not None
    writer.stdout.close()  # head alone holds the reading end now
    first, _ = head.communicate(timeout=120)
    err = writer.stderr.read().decode()
    assert writer.wait(timeout=120) == 141, err  # 128 + SIGPIPE, as a shell reports for a tool SIGPIPE ended
    assert err == "" and first  # no BrokenPipeError traceback, no "Exception ignored" at shutdown


def test_ls_json_keeps_metrics_numbers_and_is_valid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unbroken.save(tmp_path / "step_000000001", {"epoch": 1}, step=1, rng=False,
                  metrics={"loss": 1 / 3, "big": 1.2345678901e20, "n": 7, "nan": math.nan, "inf": math.inf,
                           "ninf": -math.inf})

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    code, out, err = _cli(capsys, "ls", tmp_path, "--json")
    (record,) = json.loads(out, parse_constant=strict)
    assert (code, err) == (0, "")
    assert record["metrics"] == {"loss": 1 / 3, "big": 1.2345678901e20, "n": 7, "nan": "nan", "inf": "inf",
                                 "ninf": "-inf"}  # "0.333333" and "1.23457e+20" before
    assert math.isnan(float(record["metrics"]["nan"])) and float(record["metrics"]["ninf"]) == -math.inf


def test_a_missing_metric_shows_as_a_dash_in_the_table_and_null_in_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unbroken.save(tmp_path / "step_000000001", {"epoch": 1}, step=1, rng=False, metrics={"loss": None, "acc": 0.5})
    code, out, err = _cli(capsys, "ls", tmp_path)
    assert (code, err) == (0, "") and "loss=- acc=0.5" in out  # "loss=None" before
    code, out, _ = _cli(capsys, "show", tmp_path)
    assert code == 0 and "metrics: loss=-, acc=0.5" in out
    code, out, _ = _cli(capsys, "ls", tmp_path, "--json")
    assert code == 0 and json.loads(out)[0]["metrics"] == {"loss": None, "acc": 0.5}


def test_every_command_counts_sizes_in_the_same_decimal_units(run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    size = format_size(unbroken.read_info(run / "step_000000001").manifest.total_bytes)
    assert size == "1.2 MB"  # 1_200_000 bytes of data: "1.1 MB" in units of 1024
    _, out, _ = _cli(capsys, "ls", run)
    assert re.search(r"^1 .* 1\.2 MB ", out, re.M), out
    _, out, _ = _cli(capsys, "show", run / "step_000000001")
    assert "1.2 MB in 1 file(s)" in out and "F32 [300000]  1.2 MB" in out
    _, out, _ = _cli(capsys, "verify", run / "step_000000001")
    assert "step 1, 1.2 MB verified" in out
    _, out, _ = _cli(capsys, "cp", run, tmp_path / "copy", "--step", "1")
    assert re.search(r"copied   step_000000001  1\.2 MB in [0-9.]+ s \([0-9.]+ [kMG]?B/s\)", out), out


def _stderr_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> _Terminal:
    """stderr as a terminal, and bars drawn at once (no 2 s wait) so that a test can see them.  Called
    in the test itself: pytest installs its own stderr after the fixtures are set up."""
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    return stream


def test_cp_draws_no_bar_for_a_step_already_present(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    terminal = _stderr_on_a_terminal(monkeypatch)
    assert main(["cp", str(run), str(tmp_path / "copy"), "--step", "1"]) == 0
    assert "step_000000001" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert main(["cp", str(run), str(tmp_path / "copy")]) == 0  # a 0% bar for step 1 before
    assert "step_000000001" not in terminal.getvalue() and "step_000000002" in terminal.getvalue()
    out = capsys.readouterr().out
    assert out.count("present  step_000000001") == 1 and "copied   step_000000002" in out


def test_copy_progress_is_asked_for_only_when_bytes_move(run: Path, tmp_path: Path) -> None:
    asked: list[str] = []
    unbroken.copy_checkpoints(run, tmp_path / "copy", step=1)
    unbroken.copy_checkpoints(run, tmp_path / "copy", progress=lambda name, total: asked.append(name) or None)
    assert asked == ["step_000000002"]


def test_verify_shows_progress_on_a_terminal(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _stderr_on_a_terminal(monkeypatch)
    assert main(["verify", str(run / "step_000000002")]) == 0  # silent for as long as it took before
    assert "step_000000002" in terminal.getvalue() and "/1.20M " in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert main(["verify", str(run / "step_000000002"), "--no-progress"]) == 0
    assert terminal.getvalue() == ""


def test_export_and_import_show_progress_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    unbroken.save(tmp_path / "ck", {"model": {"w": torch.ones(300_000)}}, rng=False)
    torch.save({"w": torch.ones(300_000)}, tmp_path / "weights.pt")
    terminal = _stderr_on_a_terminal(monkeypatch)
    assert main(["export", str(tmp_path / "ck"), "-o", str(tmp_path / "out")]) == 0  # silent before
    assert "model.safetensors" in terminal.getvalue() and "/1.20M " in terminal.getvalue()
    assert "1 tensors, 1.2 MB" in capsys.readouterr().out  # format_size, as every command counts
    terminal.seek(0)
    terminal.truncate()
    assert main(["import", str(tmp_path / "weights.pt"), "-o", str(tmp_path / "run"), "--step", "1"]) == 0
    assert "weights.pt" in terminal.getvalue() and "step_000000001" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert main(["export", str(tmp_path / "ck"), "-o", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert main(["import", str(tmp_path / "weights.pt"), "-o", str(tmp_path / "run"), "--step", "2",
                 "--no-progress"]) == 0
    assert terminal.getvalue() == ""


def test_verify_reports_every_byte_it_checks(run: Path) -> None:
    calls: list[tuple[str, int]] = []
    checked: list[int] = []

    def progress(name: str, total: int) -> Callable[[int], None]:
        calls.append((name, total))
        return checked.append

    record = unbroken.verify(run / "step_000000002", progress=progress)
    assert calls == [("step_000000002", 1_200_000)] and sum(checked) == 1_200_000 and record.step == 2


def test_version_and_python_m_unbroken() -> None:
    out = subprocess.run([sys.executable, "-m", "unbroken", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"unbroken {unbroken.__version__}\n", "")
