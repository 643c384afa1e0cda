"""Names are matched whole: a trailing newline (which ``$`` lets through) or a non-ASCII digit never
makes a name valid."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from unbroken.errors import CorruptCheckpointError
from unbroken.storage import LocalStorage, parse_step_name


@pytest.mark.parametrize("name", ["step_000000001\n", "step_000000001\n\n", "step_\u0660\u0660\u0660\u0660\u0660"
                                  "\u0660\u0660\u0660\u0661", "step_00000001", "xstep_000000001"])
def test_only_an_exact_step_name_names_a_step(name: str) -> None:
    assert parse_step_name(name) is None
    assert parse_step_name("step_000000001") == 1


def test_a_staging_token_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid staging token"):
        LocalStorage(tmp_path / "run").join("step_000000001", "0123456789ab\n")


def test_an_object_name_with_a_trailing_newline_is_refused() -> None:
    pytest.importorskip("fsspec")
    from unbroken.storage import FsspecStorage

    storage = FsspecStorage(f"memory://unbroken-{uuid.uuid4().hex}/run")
    for bad in ("rank00000.safetensors\n", "\n"):
        with pytest.raises(CorruptCheckpointError, match="not a plain name"):
            storage.open("step_000000001", bad)
    with pytest.raises(CorruptCheckpointError, match="not a plain name"):
        storage.open("step_000000001\n", "manifest.json")
