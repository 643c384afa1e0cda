"""The public surface: `import unbroken` exposes exactly `__all__`, each name resolvable, defined once."""

from __future__ import annotations

import importlib

import pytest

import unbroken
from unbroken.format import MANIFEST_NAME
from unbroken.storage.base import MANIFEST_FILE

# The entry points the README and DESIGN.md promise; renaming one breaks users.
README_NAMES = {
    "CheckpointManager", "save", "load", "list_checkpoints", "read_info", "verify", "prune", "copy_checkpoints",
    "DataLoader", "ResumableSampler", "KeepLast", "KeepBest", "KeepEvery", "Preempted", "EXIT_PREEMPTED",
    "UnbrokenError", "CorruptCheckpointError", "CheckpointNotFoundError", "CheckpointExistsError", "StorageError",
    "RunLockedError", "DistributedError", "CheckpointSkippedWarning", "StateMismatchError",
}


def test_every_public_name_resolves_and_is_listed() -> None:
    assert set(unbroken.__all__) >= README_NAMES
    assert len(unbroken.__all__) == len(set(unbroken.__all__))
    for name in unbroken.__all__:
        assert getattr(unbroken, name) is not None, name
    assert set(unbroken.__all__) <= set(dir(unbroken))


def test_an_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'CheckpointManger'"):
        unbroken.CheckpointManger  # noqa: B018


def test_star_import_gives_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from unbroken import *", namespace)  # noqa: S102 (our own module, to test __all__)
    assert set(unbroken.__all__) <= set(namespace)


def test_public_names_come_from_their_layers() -> None:
    assert unbroken.CheckpointManager.__module__ == "unbroken.manager.checkpoint_manager"
    assert unbroken.save.__module__ == "unbroken.checkpoint.oneshot"
    assert unbroken.DataLoader.__module__.startswith("unbroken.data.")


def test_the_version_is_defined_once() -> None:
    from importlib.metadata import version

    assert unbroken.__version__ == version("unbroken")
    single = importlib.import_module("unbroken.checkpoint.single")
    assert single.versions()["unbroken"] == unbroken.__version__


def test_storage_and_format_name_the_same_commit_file() -> None:
    # storage sits beside format (neither imports the other), so each names the manifest file.
    assert MANIFEST_FILE == MANIFEST_NAME
