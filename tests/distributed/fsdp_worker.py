"""An FSDP2 (``fully_shard``) job for tests/distributed, one process per rank (gloo, CPU).

    fsdp_worker.py save RUN OUT                 # train 3 steps, save at step 3; OUT/expected.safetensors
    fsdp_worker.py restore RUN OUT [--broadcast] # restore on this world size; OUT/restored.safetensors,
                                                 # then 2 more steps and a save (training continues)

The expected/restored files hold the full parameters and optimizer state (gathered with
``full_tensor()``, in the test only).  ``OUT/read<rank>.txt``: the bytes that rank read to restore.
"""

from __future__ import annotations

import datetime
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import unbroken


def plain_model() -> nn.Module:
    """Uneven shapes on purpose: 13 and 7 rows split unevenly over 2 and 4 ranks; the 1024x1024 layer
    (4 MiB) spans several 1 MiB checksum blocks, so a rank restoring a smaller piece reads less."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 13), nn.ReLU(), nn.Linear(13, 7))


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = plain_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(model: nn.Module, opt: torch.optim.Optimizer, first: int, last: int, rank: int) -> float:
    loss = torch.zeros(())
    for step in range(first, last + 1):
        g = torch.Generator().manual_seed(step * 100 + rank)
        x, y = torch.randn(8, 1024, generator=g), torch.randn(8, 7, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.item())


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # collective for DTensors


def dump(model: nn.Module, opt: torch.optim.Optimizer, path: Path, rank: int) -> None:
    tensors = {f"model/{k}": full(v).detach().clone() for k, v in model.state_dict().items()}
    for pid, per in opt.state_dict()["state"].items():
        tensors.update({f"opt/{pid}/{k}": full(torch.as_tensor(v)).detach().clone() for k, v in per.items()})
    if rank == 0:
        save_file(tensors, str(path))


def save_or_restore(save: bool, run: str, out: Path, broadcast: bool,
                    bytes_read: Callable[[unbroken.CheckpointManager], int], counter: str) -> None:
    """Save at step 3 (``save``), or restore and go on; ``OUT/<counter><rank>.txt`` holds what
    ``bytes_read`` says this rank read to restore (shared with s3_worker.py, which counts the store's bytes)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    model, opt = build(world)
    state = {"model": model, "optimizer": opt}
    ckpt = unbroken.CheckpointManager(run, state, async_save=False, dist_timeout=60,
                                      restore_mode="broadcast" if broadcast else "direct")
    if save:
        train(model, opt, 1, 3, rank)
        ckpt.save(3)
        dump(model, opt, out / "expected.safetensors", rank)
    else:
        step = ckpt.restore()
        (out / f"{counter}{rank}.txt").write_text(str(bytes_read(ckpt)))
        dump(model, opt, out / "restored.safetensors", rank)
        loss = train(model, opt, step + 1, step + 2, rank)
        if not math.isfinite(loss):
            raise SystemExit(f"loss {loss} after the restore")
        ckpt.save(step + 2)
        print(f"RESTORED {step} LOSS {loss}", flush=True)
    ckpt.close()


def _bytes_read(ckpt: unbroken.CheckpointManager) -> int:
    source = ckpt._dist.last_source if ckpt._dist is not None else None
    return source.bytes_read if source is not None else -1


def main() -> None:
    mode, run, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    save_or_restore(mode == "save", run, out, "--broadcast" in sys.argv, _bytes_read, "read")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
