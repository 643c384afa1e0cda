"""Exact data position: resumable sampling, per-sample seeding, and a resumable DataLoader."""

from __future__ import annotations

from .loader import DataLoader, make_resumable, needs_adoption
from .sampler import ResumableSampler
from .seeding import SeededDataset, sample_seed

__all__ = ["DataLoader", "ResumableSampler", "SeededDataset", "make_resumable", "needs_adoption", "sample_seed"]
