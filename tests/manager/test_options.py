"""Every manager option is defined once (ManagerOptions) and shows up, the same, everywhere it must:
the signature and help() of CheckpointManager, the README's option table, the ``unbroken prune`` flags
(retention options only), and one set of retention checks shared by the manager and prune."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pydoc
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import unbroken
from unbroken.cli.main import main as cli_main
from unbroken.cli.storage_commands import add_prune
from unbroken.manager.options import GROUPS, ManagerOptions, describe_options, markdown_table
from unbroken.manager.retention import RETENTION_OPTIONS

README = Path(__file__).resolve().parents[2] / "README.md"
FIELDS = {field.name: field for field in dataclasses.fields(ManagerOptions)}


def test_every_option_has_a_group_a_doc_and_a_default() -> None:
    for name, field in FIELDS.items():
        assert field.metadata["group"] in GROUPS, name
        assert len(field.metadata["doc"]) > 20, name
        assert field.default is not dataclasses.MISSING, name
    assert {info.group for info in describe_options()} == set(GROUPS)  # no empty heading


def test_signature_lists_every_option_with_its_default() -> None:
    params = inspect.signature(unbroken.CheckpointManager).parameters
    assert list(params)[:4] == ["directory", "state", "storage_options", "mirror_options"]
    options = {name: p for name, p in params.items() if name in FIELDS}
    assert set(options) == set(FIELDS) and len(params) == len(FIELDS) + 4
    for name, param in options.items():
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert param.default == FIELDS[name].default, name
        assert param.annotation is not inspect.Parameter.empty, name
    assert "every_steps: int | str | None = None" in str(inspect.signature(unbroken.CheckpointManager))  # or "auto"


def test_help_shows_every_option_with_its_doc_under_its_group() -> None:
    text = " ".join(pydoc.render_doc(unbroken.CheckpointManager, renderer=pydoc.plaintext).split())
    text = text.replace(" | ", " ")  # pydoc's left margin
    assert "Initialize self" not in text
    position = {heading: text.index(f"{heading}:") for heading in GROUPS.values()}
    assert list(position.values()) == sorted(position.values())  # groups in GROUPS order
    headings = sorted((index, key) for key, index in zip(GROUPS, position.values()))
    for info in describe_options():
        entry = f"{info.name}={info.default!r} {info.doc}"
        assert entry in text, info.name
        group = max((index, key) for index, key in headings if index < text.index(entry))[1]
        assert group == info.group, info.name


def test_unknown_keyword_is_named_with_the_close_matches(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'keep_lst' \(did you mean 'keep_last'") as e:
        unbroken.CheckpointManager(tmp_path / "run", {"x": 1}, keep_lst=3)
    assert "help(unbroken.CheckpointManager)" in str(e.value)
    with pytest.raises(TypeError, match=r"'evry_steps' \(did you mean 'every_steps'.*'zzz'; help"):
        unbroken.CheckpointManager(tmp_path / "run", {"x": 1}, evry_steps=3, zzz=1)
    assert not (tmp_path / "run").exists()  # refused before anything is created


def test_config_holds_the_given_options(tmp_path: Path) -> None:
    ckpt = unbroken.CheckpointManager(tmp_path / "run", {"x": 1}, keep_last=2, when_busy="skip", lock=False)
    try:
        assert isinstance(ckpt.config, ManagerOptions)
        assert (ckpt.config.keep_last, ckpt.config.when_busy, ckpt.config.lock) == (2, "skip", False)
        assert ckpt.config.every_minutes is None and ckpt.config.dist_timeout == 600.0
    finally:
        ckpt.close()


def _prune_parser() -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser(prog="unbroken").add_subparsers()
    add_prune(sub)
    parser: argparse.ArgumentParser = sub.choices["prune"]
    return parser


def test_retention_options_and_only_those_are_prune_flags() -> None:
    assert set(RETENTION_OPTIONS) <= set(FIELDS)
    assert {name for name, f in FIELDS.items() if f.metadata["group"] == "retention"} == set(RETENTION_OPTIONS)
    assert list(inspect.signature(unbroken.prune).parameters)[1:6] == list(RETENTION_OPTIONS)
    parser = _prune_parser()
    flags = parser._option_string_actions
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert (flag in flags) == (name in RETENTION_OPTIONS), flag
    for name in RETENTION_OPTIONS:
        action = flags["--" + name.replace("_", "-")]
        info = next(i for i in describe_options() if i.name == name)
        assert action.dest == name and action.default == FIELDS[name].default
        assert inspect.signature(unbroken.prune).parameters[name].default == FIELDS[name].default
        assert action.help is not None and action.help.replace("%%", "%") == info.plain_doc
        assert action.type is info.value_type and action.choices == info.choices
    args = parser.parse_args(["run", "--keep-best", "2", "--metric", "acc", "--mode", "max"])
    assert (args.keep_best, args.best_metric, args.best_mode) == (2, "acc", "max")  # the older spellings


def make_run(run: Path, steps: int = 4) -> None:
    state = {"w": torch.zeros(4)}
    ckpt = unbroken.CheckpointManager(run, state, every_steps=1, async_save=False)
    for step in range(1, steps + 1):
        ckpt.step(step, metrics={"acc": step % 3})
    ckpt.close()


def test_prune_flags_reach_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    make_run(run)
    argv = ["prune", str(run), "--keep-best", "1", "--best-metric", "acc", "--best-mode", "max", "--dry-run"]
    assert cli_main(argv) == 0
    assert "kept 2 checkpoint(s): [2, 4]" in capsys.readouterr().out
    assert cli_main(["prune", str(run), "--best-metric", "acc", "--keep-last", "1"]) == 2
    # The command line names its own flags (issue 16), not the Python argument names.
    assert "--best-metric='acc' is set but --keep-best is not; set --keep-best=N" in capsys.readouterr().err


BAD_RETENTION = [
    {"keep_last": 0}, {"keep_last": True}, {"keep_best": 2}, {"keep_best": 0, "best_metric": "loss"},
    {"best_metric": "loss"}, {"keep_best": 1, "best_metric": "loss", "best_mode": "lowest"},
    {"best_mode": "lowest", "keep_last": 1}, {"keep_every": 2.5}, {"keep_every": -5},
]


@pytest.mark.parametrize("settings", BAD_RETENTION)
def test_prune_and_the_manager_refuse_the_same_retention_settings_alike(tmp_path: Path,
                                                                        settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as by_manager:
        unbroken.CheckpointManager(tmp_path / "run", {"x": 1}, **settings)
    make_run(tmp_path / "pruned", steps=1)
    with pytest.raises(ValueError) as by_prune:
        unbroken.prune(tmp_path / "pruned", **settings)
    assert str(by_manager.value) == str(by_prune.value)
    assert re.search(r"keep_|best_", str(by_manager.value))  # names the option


def test_readme_option_table_matches_the_options() -> None:
    text = README.read_text()
    start = text.index("<!-- options table:")
    table = text[text.index("\n", start) + 1:text.index("<!-- end of options table -->")].strip()
    assert table == markdown_table(), (
        "README.md's option table differs from src/unbroken/manager/options.py; regenerate it with "
        ".venv/bin/python -c 'from unbroken.manager.options import markdown_table; print(markdown_table())'")
    rows = [line.split(" | ")[0].strip("| `") for line in table.splitlines()[2:] if not line.startswith("| **")]
    assert rows == [info.name for info in describe_options()] and set(rows) == set(FIELDS)


def test_options_and_retention_import_without_torch() -> None:
    code = "import sys, unbroken.manager.options, unbroken.manager.retention; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
