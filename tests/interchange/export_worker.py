"""A 2-rank job (gloo, CPU) saving the checkpoints the export tests read, in one launch:

    export_worker.py ROOT

* ``ROOT/ddp``: a DDP model (replicated: its tensors spread over both ranks' files), its optimizer
  and an EMA (``AveragedModel``), saved at step 1; ``ROOT/ddp_expected.safetensors``: the model's
  and the EMA's full state dicts (``model/<key>``, ``ema/<key>``).
* ``ROOT/fsdp``: an FSDP2 model (``fully_shard``: every tensor saved as two pieces, uneven rows) and
  its optimizer, saved at step 1; ``ROOT/fsdp_expected.safetensors``: the model's full state dict
  (gathered with ``full_tensor()``, in the test only).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import unbroken


def ddp_model() -> nn.Module:
    """No BatchNorm: its running statistics differ between DDP ranks after a step (each rank's own
    batch) until the next forward broadcasts rank 0's, so no one state dict is "the" model's."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def fsdp_model() -> nn.Module:
    """13 and 7 rows: split unevenly over 2 ranks."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 13), nn.ReLU(), nn.Linear(13, 7))


def step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, inputs: int) -> None:
    g = torch.Generator().manual_seed(10 + rank)
    loss = model(torch.randn(4, inputs, generator=g)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def save_ddp(root: Path, rank: int) -> None:
    model = ddp_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(2):
        step(ddp, opt, rank, 6)
        ema.update_parameters(model)
    ckpt = unbroken.CheckpointManager(root / "ddp", {"model": ddp, "optimizer": opt, "ema": ema},
                                      async_save=False, dist_timeout=60)
    ckpt.save(1)
    ckpt.close()
    if rank == 0:
        tensors = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
        tensors.update({f"ema/{k}": v.detach().clone() for k, v in ema.state_dict().items()})
        save_file(tensors, str(root / "ddp_expected.safetensors"))


def save_fsdp(root: Path, rank: int, world: int) -> None:
    model = fsdp_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt, rank, 8)
    ckpt = unbroken.CheckpointManager(root / "fsdp", {"model": model, "optimizer": opt}, async_save=False,
                                      dist_timeout=60)
    ckpt.save(1)
    ckpt.close()
    full = {f"model/{k}": v.full_tensor().detach().clone() for k, v in model.state_dict().items()}  # collective
    if rank == 0:
        save_file(full, str(root / "fsdp_expected.safetensors"))


def main() -> None:
    root = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    save_ddp(root, rank)
    save_fsdp(root, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
