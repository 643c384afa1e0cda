"""Adapters for the frameworks our users train in (Lightning, Hugging Face, Accelerate).

Top layer, beside ``cli``: adapters use the public API (``unbroken.CheckpointManager`` and friends)
only.  Empty until the first adapter lands.
"""
