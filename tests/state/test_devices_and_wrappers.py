"""DDP unwrapping with a real (single-rank, gloo) process group, and CUDA paths when a GPU is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import unbroken


@pytest.fixture()
def process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_model_saves_plain_names_and_loads_into_plain_model(tmp_path: Path, process_group: None) -> None:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    unbroken.save(tmp_path / "ck", {"model": ddp})
    names = set(unbroken.read_info(tmp_path / "ck").state["model"][1])
    assert names == {"weight", "bias"}
    plain = {"model": nn.Linear(4, 2)}
    unbroken.load(tmp_path / "ck", plain)
    assert torch.equal(plain["model"].weight, ddp.module.weight)
    back = {"model": nn.parallel.DistributedDataParallel(nn.Linear(4, 2))}
    unbroken.load(tmp_path / "ck", back)
    assert torch.equal(back["model"].module.bias, ddp.module.bias)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_saved_on_gpu_restored_on_cpu_and_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 8, device="cuda")).sum().backward()
    opt.step()
    unbroken.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    cpu_model = nn.Linear(8, 4)
    cpu_opt = torch.optim.Adam(cpu_model.parameters())
    unbroken.load(tmp_path / "ck", {"model": cpu_model, "optimizer": cpu_opt})
    assert torch.equal(cpu_model.weight, model.weight.cpu())
    assert cpu_opt.state_dict()["state"][0]["exp_avg"].device.type == "cpu"
    gpu_model = nn.Linear(8, 4).cuda()
    unbroken.load(tmp_path / "ck", {"model": gpu_model, "optimizer": torch.optim.Adam(gpu_model.parameters())})
    assert torch.equal(gpu_model.weight, model.weight)


@cuda
def test_cuda_rng_is_captured_and_restored(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(3)
    torch.rand(1, device="cuda")
    unbroken.save(tmp_path / "ck", {"x": 1})
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    unbroken.load(tmp_path / "ck", {"x": 0})
    assert torch.equal(torch.rand(4, device="cuda"), expected)
