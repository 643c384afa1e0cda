"""tests/shared_reference.py: a reference run is made once per key and session, and read back as made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.shared_reference import session_environment, shared_run


def test_a_reference_runs_once_per_key_and_its_record_and_files_are_shared(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[Path] = []

    def produce(workdir: Path) -> dict[str, Any]:
        assert not list(workdir.iterdir())  # an empty directory of its own
        runs.append(workdir)
        (workdir / "out.txt").write_text("made")
        return {"losses": {"1": "0x1.8p+0"}}

    first = shared_run(tmp_path_factory, "probe", {"argv": ["a", str(tmp_path)]}, produce)
    again = shared_run(tmp_path_factory, "probe", {"argv": ["a", str(tmp_path)]}, produce)
    other = shared_run(tmp_path_factory, "probe", {"argv": ["b", str(tmp_path)]}, produce)
    assert runs == [first[0], other[0]]  # the second request with an equal key reads the first run's record
    assert first == again and first[1] == {"losses": {"1": "0x1.8p+0"}}
    assert (again[0] / "out.txt").read_text() == "made"

    environment = session_environment()
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test")
    assert session_environment() == environment  # pytest's own variables differ between workers
    monkeypatch.setenv("UNBROKEN_PROBE", "1")
    assert session_environment() != environment  # what a run may read is part of the key


def test_a_reference_whose_run_failed_is_run_again_by_the_next_test(tmp_path_factory: pytest.TempPathFactory,
                                                                   tmp_path: Path) -> None:
    key = {"argv": [str(tmp_path), "fails once"]}

    def fail(workdir: Path) -> dict[str, Any]:
        (workdir / "half-written").write_text("")
        raise RuntimeError("the reference run failed")

    with pytest.raises(RuntimeError, match="the reference run failed"):
        shared_run(tmp_path_factory, "probe-failing", key, fail)
    _, record = shared_run(tmp_path_factory, "probe-failing", key, lambda workdir: {
        "left over": sorted(p.name for p in workdir.iterdir())})
    assert record == {"left over": []}  # ran again, in an emptied directory
