"""Per-rank state on resume: each rank's own entries, and the policy when the world size changed.

Same number of ranks: rank ``r`` gets exactly what rank ``r`` saved.

Saved by ``N`` ranks, resumed on ``M != N`` (docs/DISTRIBUTED.md):

* an entry every saved rank holds identically (an LR scheduler, ``epoch``, the args) is given to
  every new rank;
* RNG streams: new rank ``r < N`` continues saved rank ``r``'s streams exactly; a new rank
  ``r >= N`` starts from saved rank ``r mod N``'s streams, re-seeded with a seed derived from those
  streams and ``r`` (:func:`derive_rng`), so no two new ranks share a stream and a rerun derives
  the same seeds;
* an entry whose saved states differ between ranks is handed, as every saved rank's state, to its
  live object's ``reshard_state_dict(states)``, which returns the state this rank loads
  (``unbroken.DataLoader`` and ``ResumableSampler`` re-split the rest of the epoch across the new
  ranks); an object without that method cannot be re-split: ``StateMismatchError`` (``strict=False``
  leaves it as it is, with a warning).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError, StateMismatchError
from ..format import Manifest, TensorEntry
from ..format.values import Json, decode, encode
from ..state.capture import RNG_KEY
from .roles import rename_refs, split_entries

__all__ = ["RankChoice", "saved_ranks", "choose_entries", "derive_rng"]

_PREFIX = "unbroken.rank"


@dataclass
class RankChoice:
    tree: dict[str, Json] = field(default_factory=dict)
    """The per-rank entries this rank restores (their tensors keep their stored names)."""
    derive_rng: bool = False
    problems: list[str] = field(default_factory=list)


def saved_ranks(manifest: Manifest) -> tuple[dict[str, Json], list[dict[str, Json]]]:
    """``(shared entries, per-rank entries of each saved rank)``; a single-process checkpoint is one rank."""
    if manifest.rank_state is not None:
        return manifest.state, manifest.rank_state
    shared, per_rank = split_entries(manifest.state)
    return shared, [per_rank]


def choose_entries(saved: list[dict[str, Json]], rank: int, world_size: int, live: Mapping[str, Any],
                   tensors: dict[str, TensorEntry]) -> RankChoice:
    if len(saved) == world_size:
        return RankChoice(dict(saved[rank]))
    choice = RankChoice()
    for key in dict.fromkeys(k for ranks in saved for k in ranks):
        nodes = [ranks.get(key) for ranks in saved]
        if key == RNG_KEY:
            choice.tree[key] = nodes[rank % len(saved)]
            choice.derive_rng = rank >= len(saved)
        elif _all_equal(nodes, tensors):
            choice.tree[key] = nodes[0]
        else:
            _reshard(key, nodes, live.get(key), choice)
    return choice


def _all_equal(nodes: list[Json | None], tensors: dict[str, TensorEntry]) -> bool:
    """Equal trees, and equal bytes (by checksum) for the tensors they refer to."""
    if any(node is None for node in nodes):
        return False
    seen: list[list[Any]] = []

    def strip(name: str) -> str:
        entry = tensors.get(name)
        seen[-1].append(None if entry is None else (entry.dtype, entry.shape, entry.crc32c))
        return name.split("/", 1)[1] if name.startswith(_PREFIX) else name

    texts = []
    for node in nodes:
        seen.append([])
        texts.append(json.dumps(rename_refs(node, strip), sort_keys=True))
    return all(t == texts[0] for t in texts) and all(s == seen[0] for s in seen)


def _reshard(key: str, nodes: list[Json | None], live: Any, choice: RankChoice) -> None:
    hook = getattr(live, "reshard_state_dict", None)
    saved = f"{len(nodes)} saved ranks"
    entries = [n for n in nodes if isinstance(n, dict) and "value" in n]
    if not callable(hook) or len(entries) != len(nodes):
        choice.problems.append(f"{key!r}: differs between the {saved} and its object has no "
                               "reshard_state_dict() to split it across a different number of ranks")
        return
    try:
        states = [decode(entry["value"], _no_tensor) for entry in entries]
    except CorruptCheckpointError:
        choice.problems.append(f"{key!r}: differs between the {saved} and holds tensors; it cannot be re-split")
        return
    try:
        state = hook(states)
    except StateMismatchError as exc:
        choice.problems.append(f"{key!r}: {exc}")
        return
    node = dict(entries[0])
    node["value"] = encode(state, key, _no_tensor_out)
    choice.tree[key] = node


def _no_tensor(name: str) -> Any:
    raise CorruptCheckpointError(f"refers to tensor {name!r}")


def _no_tensor_out(where: str, _tensor: torch.Tensor) -> str:
    raise StateMismatchError(f"{where}: reshard_state_dict() must return a state without tensors")


def derive_rng(rank: int) -> int:
    """Re-seed Python, NumPy and torch (CPU and every CUDA device) from the current torch stream and
    ``rank``; the seed used.  Called after a saved rank's streams were restored on a new rank."""
    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes() + rank.to_bytes(8, "little")).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return seed
