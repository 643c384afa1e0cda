"""The package version: the one definition (pyproject.toml reads it; checkpoints record it)."""

__version__ = "0.1.0"
