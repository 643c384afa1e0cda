"""The training process of the kill sweep (tests/killsweep.py): killed at a failpoint, then resumed.

    python tests/sweep_train.py RUN_DIR sync|async TOTAL_STEPS

Writes one event per line to stdout:
    RESTORED <step> <digest> <debris>   after restore(); debris = staging/trash entries left (0 expected)
    DIGEST <step> <digest>              the state at the end of each step (what a save of it must hold)
    COMMITTED <step>                    a checkpoint is committed (logged by the manager after the
                                        commit's directory fsync, from the writer thread)
    DONE <digest>                       training finished
The digest covers parameters, optimizer state, the step counter and the torch RNG, so a restored
checkpoint that differs from what was saved in any bit is caught.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys

import torch
from torch import nn

import unbroken


def emit(line: str) -> None:
    # One write(2) per line: the writer thread's COMMITTED lines never interleave with the loop's.
    os.write(1, (line + "\n").encode())


class CommitEcho(logging.Handler):
    PATTERN = re.compile(r"saved checkpoint step (\d+)")

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.match(record.getMessage())
        if match:
            emit(f"COMMITTED {match.group(1)}")


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for tensor in list(state["model"].state_dict().values()):
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    for group in state["optimizer"].state.values():
        for value in group.values():
            if isinstance(value, torch.Tensor):
                h.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    h.update(str(state["step"]).encode())
    return h.hexdigest()[:16]


def main() -> None:
    run, mode, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logger = logging.getLogger("unbroken")
    logger.setLevel(logging.INFO)
    logger.addHandler(CommitEcho())
    torch.set_num_threads(1)  # multi-threaded CPU kernels were not bitwise reproducible under load (1 run in 9)
    torch.manual_seed(0)
    # One 4 MiB weight (written straight from tensor memory) and small tensors (coalesced), so a save
    # passes several write points per file.
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 1))
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3), "step": 0}
    ckpt = unbroken.CheckpointManager(run, state, every_steps=2, keep_last=2, async_save=(mode == "async"))
    start = ckpt.restore()
    debris = [e for e in os.listdir(run) if e.startswith((".staging-", ".trash-"))]
    emit(f"RESTORED {start} {digest(state)} {len(debris)}")
    for step in range(start + 1, total + 1):
        x = torch.randn(32, 64)
        loss = model(x).pow(2).mean()
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()
        state["step"] = step
        emit(f"DIGEST {step} {digest(state)}")
        ckpt.step(step)
    ckpt.close()
    emit(f"DONE {digest(state)}")


if __name__ == "__main__":
    main()
