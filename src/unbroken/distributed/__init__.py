"""Checkpoints of torch.distributed jobs: every rank saves its part, one commit, resume on any world size.

torch.distributed is the engine (process groups, collectives, DTensor); the format stays unbroken's
(a manifest plus safetensors files, docs/FORMAT.md).  Modules (one concept each):

* :mod:`.world`, :mod:`.collectives`: who we are; JSON/bytes collectives on a gloo side group
* :mod:`.roles`, :mod:`.shards`, :mod:`.rankplan`: what each rank writes (replicated, sharded, per-rank)
* :mod:`.assemble`, :mod:`.commit`, :mod:`.saver`: the commit protocol and the manager's saver
* :mod:`.sources`, :mod:`.load`, :mod:`.rankstate`, :mod:`.resume`: restoring, resharding, agreeing
* :mod:`.run`: the manager's entry point (:func:`.run.attach`)

Submodules are imported where used: the top-level save/load path needs :mod:`.shards` without the rest.
"""

from __future__ import annotations
