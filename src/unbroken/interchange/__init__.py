"""Checkpoints that travel: out of unbroken for inference (``export``, ``read_state_dict``), in from
existing torch checkpoints (``import_checkpoint``), and compared (``diff``).

Layer: above ``manager`` (an import writes a run the manager resumes), below ``cli``.  Each module
holds one direction: ``state_dict`` assembles whole tensors from any checkpoint (every rank's file,
every sharded piece), ``export`` writes them as safetensors, ``importing`` reads legacy files
(weights-only), ``diff`` compares two checkpoints.
"""
