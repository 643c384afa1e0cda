"""HSDP (``fully_shard`` on a 2-D mesh: replicated x sharded) and a column-sharded (``Shard(1)``)
DTensor parameter, for tests/distributed/test_dtensor_layouts.py.

    dtensor_worker.py save RUN OUT      # 4 ranks: 2x2 HSDP mesh; OUT/expected.safetensors
    dtensor_worker.py restore RUN OUT   # 2 ranks: plain FSDP2 and Shard(1) on 2; OUT/restored.safetensors
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
from torch.distributed.tensor import Shard, distribute_tensor

import unbroken


class Columns(nn.Module):
    def __init__(self, mesh: object) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.p = nn.Parameter(distribute_tensor(torch.randn(6, 10), mesh, [Shard(1)]))  # type: ignore[arg-type]


def main() -> None:
    mode, run, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    flat = init_device_mesh("cpu", (world,))
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if mode == "save" else flat
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "columns": Columns(flat), "optimizer": opt}
    ckpt = unbroken.CheckpointManager(run, state, async_save=False, save_on_close=False, dist_timeout=60)
    if mode == "save":
        for step in range(2):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step * 10 + rank))
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        ckpt.save(2)
    else:
        assert ckpt.restore() == 2
    tensors = {f"model/{k}": v.full_tensor().clone() for k, v in model.state_dict().items()}
    tensors["columns"] = state["columns"].p.full_tensor().clone()
    for pid, per in opt.state_dict()["state"].items():
        for k, v in per.items():
            tensors[f"opt/{pid}/{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    if rank == 0:
        save_file(tensors, str(out / ("expected.safetensors" if mode == "save" else "restored.safetensors")))
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
