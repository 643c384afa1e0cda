"""Checkpoints of torch.distributed jobs: every rank saves its part, one commit, resume on any world size.

torch.distributed is the engine (process groups, collectives, DTensor); the format stays unbroken's
(a manifest plus safetensors files, docs/FORMAT.md).  Modules (one concept each):

* :mod:`.world`, :mod:`.collectives`: who we are; JSON/bytes collectives on a gloo side group
* :mod:`.roles`, :mod:`.shards`, :mod:`.rankplan`: what each rank writes (replicated, sharded, per-rank)
* :mod:`.assemble`, :mod:`.commit`: the commit protocol
* :mod:`.sources`, :mod:`.load`, :mod:`.rankstate`, :mod:`.resume`: restoring, resharding, agreeing

The manager's side (its distributed saver and restore, the agreed schedule) is in
:mod:`unbroken.manager.ranks`.  Submodules are imported where used: the single-process save/load path
needs :mod:`.shards` without the rest.
"""

from __future__ import annotations
