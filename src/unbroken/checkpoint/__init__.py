"""One checkpoint end to end, and the checkpoints of a run directory.

* :mod:`.single`: save one checkpoint (capture, plan, write, commit) and load one (verify, restore)
* :mod:`.oneshot`: ``unbroken.save`` / ``unbroken.load``
* :mod:`.newest`: restore the newest valid checkpoint of a run, skipping broken ones loudly
* :mod:`.listing`: a run's checkpoints as :class:`~.listing.CheckpointRecord` rows
* :mod:`.inspection`: ``list_checkpoints``, ``read_info``, ``verify`` (nothing restored)
* :mod:`.transfer`: copy one committed checkpoint between storages
* :mod:`.target`: the checkpoint a path means (a checkpoint, or a run's newest valid one or step N)

May import ``distributed`` and everything below it (docs/ARCHITECTURE.md); submodules are imported
where used, so importing this package is cheap.
"""
