"""The :class:`~unbroken.CheckpointManager` and what it decides: when to save, which checkpoints to keep,
resuming, the mirror, the run lock, pre-emption stops, and run maintenance (prune, copy).

* :mod:`.checkpoint_manager`: the manager
* :mod:`.options`: every manager option, defined and documented once
* :mod:`.schedule`, :mod:`.retention`: when to save; which checkpoints to keep
* :mod:`.save_runner`: runs saves synchronously or in the background, one at a time
* :mod:`.ranks`, :mod:`.rank_saver`: the manager under torch.distributed
* :mod:`.mirror`, :mod:`.runlock`, :mod:`.preemption`: second tier, one writer per run, stops
* :mod:`.maintenance`: ``unbroken.prune`` and ``unbroken.copy_checkpoints``

Submodules are imported where used: the supervisor reads :mod:`.preemption` without torch.
"""
