"""A tiny Accelerate training loop with unbroken's ``Checkpointing``, in-process (``train``) or as a worker.

Worker: ``python accelerate_train.py --run-dir D --out O [--max-steps 8] [--every 3]``.  Running the
same command again resumes (``ckpt.restore()``); with ``KILL_AT=K`` in the environment the process
SIGKILLs itself at optimizer step K unless the run resumed.  Under torch.distributed the ranks are started by the
test with the torchrun environment (``Accelerator(cpu=True)`` joins them with gloo); every rank
kills itself at the same step.

Randomness the resume must restore: the prepared, shuffled DataLoader (a ``DataLoaderShard``), dropout
and input noise from the global torch RNG, Adam and a per-step LR schedule, and gradient accumulation
over 2 batches (``accelerator.step``).  Every optimizer step's loss goes to ``O/losses.rank<r>.jsonl``
(float.hex: exact); at the end ``O/final.safetensors`` holds the weights and the optimizer state and
``O/final.json`` the counters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

if __name__ == "__main__":  # run as a script: the repository root on the path, for `tests.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from unbroken.integrations.accelerate import Checkpointing  # noqa: E402

SAMPLES, BATCH, ACCUMULATE = 40, 4, 2  # 10 batches = 5 optimizer steps per epoch
STEPS, EVERY = 12, 3  # checkpoints at 3, 6 (mid-epoch 1), 9, 12; epoch 2 starts at step 11


def build(accumulate: int = ACCUMULATE) -> tuple[Accelerator, nn.Module, Any, Any, Any]:
    """The usual Accelerate setup: seed, data, model, optimizer, scheduler, prepare."""
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)  # in-process runs: a fresh Accelerator each
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    set_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 4), torch.randn(SAMPLES, 1))
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9 ** s)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return accelerator, model, optimizer, loader, scheduler


def train(run_dir: Path | None, out: Path | None = None, max_steps: int = STEPS, every: int = EVERY,
          kill_at: int | None = None, **options: Any) -> dict[str, Any]:
    """Train to ``max_steps`` optimizer steps (with ``run_dir=None``: without the adapter); returns
    {"losses": {step: hex}, "tensors": {...}, "counters": {...}}."""
    accelerator, model, optimizer, loader, scheduler = build()
    ckpt = None if run_dir is None else Checkpointing(accelerator, run_dir, every_steps=every, **options)
    step = 0 if ckpt is None else ckpt.restore()
    resumed = step > 0
    losses: dict[int, str] = {}
    log = None if out is None else (out / f"losses.rank{accelerator.process_index}.jsonl").open("a")
    while step < max_steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                noisy = x + 0.01 * torch.randn_like(x)
                loss = F.mse_loss(model(noisy), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses[step] = float(loss.item()).hex()
            if log is not None:
                log.write(json.dumps([step, losses[step]]) + "\n")
                log.flush()
            if kill_at == step and not resumed:
                os.kill(os.getpid(), signal.SIGKILL)
            if ckpt is not None:
                ckpt.step(step)
            if step == max_steps:
                break
    if ckpt is not None:
        ckpt.close()  # saves the last step (save_on_close)
    result = {"losses": losses, "tensors": final_tensors(accelerator, model, optimizer),
              "counters": {"step": step, "accelerator_step": accelerator.step, "epoch": loader.iteration,
                           "lr": scheduler.get_last_lr()[0].hex()}}
    if out is not None:
        save_file(result["tensors"], str(out / f"final.rank{accelerator.process_index}.safetensors"))
        (out / f"final.rank{accelerator.process_index}.json").write_text(json.dumps(result["counters"]))
    accelerator.end_training()
    return result


def final_tensors(accelerator: Accelerator, model: nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=STEPS)
    parser.add_argument("--every", type=int, default=EVERY)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kill_at = os.environ.get("KILL_AT")
    train(args.run_dir, args.out, args.max_steps, args.every, None if kill_at is None else int(kill_at))


if __name__ == "__main__":
    main()
