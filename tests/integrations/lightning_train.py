"""A tiny Lightning training run with the Unbroken callback, in-process (``train``) or as a worker.

Worker: ``python lightning_train.py --run-dir D --out O [--max-steps 12] [--every 3] [--kill-at K]
[--devices 2]``.  Running the same command again resumes (``ckpt_path="last"``); ``--kill-at K``
SIGKILLs the process at step K unless the run resumed.  Under DDP the ranks are started by the test
with the torchrun environment (``LOCAL_RANK``...), and every rank kills itself at the same step.

Randomness the resume must restore: a shuffled DataLoader (made resumable by the callback), dropout
and input noise drawn from the global torch RNG, Adam and a per-step LR schedule; validation runs
right after each save (iterating its plain DataLoader draws from the global torch RNG).  Every step's loss
goes to ``O/losses.rank<r>.jsonl`` (as float.hex, exact); at the end ``O/final.safetensors`` holds
the weights and the optimizer state and ``O/final.json`` the counters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

SAMPLES, BATCH = 40, 4  # 10 batches per epoch: 12 steps cross an epoch boundary
VALIDATE_EVERY = 3  # right after the saves (every 3 steps): validation runs between a save and the next step


class Net(L.LightningModule):
    def __init__(self, losses: Path | None = None, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters({"hidden": hidden, "lr": 0.01})
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))
        self.losses_path = losses
        self.losses: list[tuple[int, str]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = x + 0.01 * torch.randn_like(x)
        loss = F.mse_loss(self.net(x), y)
        record = (int(self.global_step) + 1, float(loss.item()).hex())  # the step this batch completes
        self.losses.append(record)
        if self.losses_path is not None:
            with self.losses_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(SAMPLES, 4, generator=gen)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=BATCH, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class SignalAt(L.Callback):
    """Sends ``sig`` to this process at step ``step``, in a run that did not resume."""

    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig, self.resumed = step, sig, False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resumed = trainer.global_step > 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.resumed and trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def trainer(max_steps: int, callbacks: list[L.Callback], devices: int = 1, root: Path | None = None) -> L.Trainer:
    """``root``: where Lightning's default ModelCheckpoint writes when there is no Unbroken callback."""
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices, default_root_dir=root,
                     strategy="ddp" if devices > 1 else "auto", callbacks=callbacks, enable_progress_bar=False,
                     logger=False, enable_model_summary=False, num_sanity_val_steps=0,
                     val_check_interval=VALIDATE_EVERY, check_val_every_n_epoch=None)


def train(run_dir: Path | None, max_steps: int = 12, every: int = 3, signal_at: tuple[int, int] | None = None,
          devices: int = 1, losses: Path | None = None, root: Path | None = None,
          **options: Any) -> tuple[L.Trainer, Net]:
    """One ``fit`` (resuming from ``run_dir`` when it holds a checkpoint); no adapter when run_dir is None."""
    from unbroken.integrations.lightning import Unbroken

    L.seed_everything(1234, verbose=False)
    model = Net(losses)
    callbacks: list[L.Callback] = []
    if run_dir is not None:
        callbacks.append(Unbroken(run_dir, every_steps=every, **options))
    if signal_at is not None:
        callbacks.append(SignalAt(*signal_at))
    t = trainer(max_steps, callbacks, devices, root)
    t.fit(model, ckpt_path="last")
    return t, model


def final_tensors(t: L.Trainer, model: Net) -> dict[str, torch.Tensor]:
    """Weights and optimizer state, flat, for a bitwise comparison."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    opt = t.optimizers[0].state_dict()
    for pid, per_param in opt["state"].items():
        for name, value in per_param.items():
            out[f"opt.{pid}.{name}"] = torch.as_tensor(value).clone()
    return out


def counters(t: L.Trainer) -> dict[str, Any]:
    return {"global_step": t.global_step, "epoch": t.current_epoch,
            "lr": t.optimizers[0].param_groups[0]["lr"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    kill = None if args.kill_at is None else (args.kill_at, signal.SIGKILL)
    t, model = train(args.run_dir, args.max_steps, args.every, kill, args.devices,
                     losses=args.out / f"losses.rank{rank}.jsonl")
    if rank == 0:
        save_file(final_tensors(t, model), str(args.out / "final.safetensors"))
        (args.out / "final.json").write_text(json.dumps(counters(t)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
