"""The methods bench/per_tensor.py times: durable saves, async stalls and restores, each checkpointing
one state into its own file or directory under ``out``.

Every function does exactly what its user would write, state_dict() calls included (all methods pay
them); imports happen at module import, outside every timed region.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from benchlib import as_bytes, flat, flat_state_dicts, fsync_tree, read_all, write_all
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

import unbroken
import unbroken.manager  # noqa: F401 - the lazy public API's modules load here, not inside a timed call

# DCP warns on every call that it assumes a single process (no process group): intended here.
warnings.filterwarnings("ignore")

State = dict[str, Any]


# -- saves -----------------------------------------------------------------------------------------------
def save_floor(state: State, out: Path) -> None:
    fd = os.open(out / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in flat(state).values():
            write_all(fd, as_bytes(t))
        os.fsync(fd)
    finally:
        os.close(fd)


def save_unbroken(state: State, out: Path) -> None:
    unbroken.save(out / "ub", state, rng=False)


def save_torch(state: State, out: Path) -> None:
    torch.save({k: v.state_dict() for k, v in state.items()}, out / "torch.pt")
    fsync_tree(out / "torch.pt")


def save_safetensors(state: State, out: Path) -> None:
    state_dicts = {k: v.state_dict() for k, v in state.items()}
    meta = {"param_groups": json.dumps(state_dicts["optimizer"]["param_groups"])} if "optimizer" in state else None
    save_file(flat_state_dicts(state_dicts), str(out / "st.safetensors"), metadata=meta)
    fsync_tree(out / "st.safetensors")


def dcp_state(state: State) -> State:
    """DCP's documented state dict (get_state_dict also creates optimizer state a fresh optimizer lacks)."""
    if "optimizer" in state:
        model, optim = get_state_dict(state["model"], state["optimizer"])
        return {"model": model, "optim": optim}
    return {"model": get_model_state_dict(state["model"])}


def save_dcp(state: State, out: Path) -> None:
    dcp.save(dcp_state(state), checkpoint_id=str(out / "dcp"))
    fsync_tree(out / "dcp")


SAVES: dict[str, Callable[[State, Path], None]] = {
    "floor": save_floor, "unbroken": save_unbroken, "torch.save": save_torch,
    "safetensors": save_safetensors, "dcp": save_dcp}


# -- async stalls ------------------------------------------------------------------------------------------------
def compute(seconds: float) -> None:
    """Training-like work (matmuls) between building a manager and its first save."""
    x, w = torch.randn(256, 256), torch.randn(256, 256) / 16
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = torch.tanh(x @ w)


def stall_memcpy(state: State, out: Path, settle: float = 1.0) -> dict[str, float]:  # noqa: ARG001
    sources = [t.detach().reshape(-1).view(torch.uint8) for t in flat(state).values()]
    buf = torch.empty(sum(s.numel() for s in sources), dtype=torch.uint8)  # untouched: the first pass faults it in
    slices, at = [], 0
    for s in sources:
        slices.append(buf[at:at + s.numel()])
        at += s.numel()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for dst, src in zip(slices, sources, strict=True):
            dst.copy_(src)
        times.append(time.perf_counter() - start)
    return {"first": times[0], "stall": times[1]}


def stall_unbroken(state: State, out: Path, settle: float = 1.0) -> dict[str, float]:
    start = time.perf_counter()
    mgr = unbroken.CheckpointManager(out / "async_ub", state, every_steps=1, capture_rng=False, save_on_close=False)
    built = time.perf_counter() - start
    compute(settle)
    times = []
    for step in (1, 2):
        start = time.perf_counter()
        mgr.step(step)
        stall = time.perf_counter() - start
        mgr.wait()
        times += [stall, time.perf_counter() - start]
    mgr.close()
    return {"first": times[0], "stall": times[2], "commit": times[3], "construct": built}


def _done(response: Any) -> None:
    (response.upload_completion if hasattr(response, "upload_completion") else response).result()


def stall_dcp(state: State, out: Path, settle: float = 1.0) -> dict[str, float]:
    stager = DefaultStager(StagingOptions(False, False, False, False))  # CPU: no pinning, staged in step
    compute(settle)
    times = []
    for step in (1, 2):  # the second save reuses the stager's buffers
        start = time.perf_counter()
        response = dcp.async_save(dcp_state(state), checkpoint_id=str(out / f"async_dcp{step}"), async_stager=stager)
        stall = time.perf_counter() - start
        _done(response)
        times += [stall, time.perf_counter() - start]
    stager.close()
    return {"first": times[0], "stall": times[2], "commit": times[3]}


STALLS: dict[str, Callable[..., dict[str, float]]] = {
    "memcpy": stall_memcpy, "unbroken": stall_unbroken, "dcp": stall_dcp}


# -- restores (into fresh objects) ---------------------------------------------------------------------------
Template = Callable[[], State]


def ready_floor(target: State, template: Template) -> list[torch.Tensor]:  # noqa: ARG001
    return [torch.zeros_like(t) for t in flat(template()).values()]  # preallocated and touched


def load_floor(tensors: list[torch.Tensor], out: Path) -> None:
    with open(out / "floor.bin", "rb", buffering=0) as f:
        for t in tensors:
            read_all(f, as_bytes(t))


def ready_target(target: State, template: Template) -> State:  # noqa: ARG001
    return target


def load_unbroken(target: State, out: Path) -> None:
    unbroken.load(out / "ub", target, rng=False)


def load_torch(target: State, out: Path) -> None:
    saved = torch.load(out / "torch.pt", weights_only=True)
    for key, obj in target.items():
        obj.load_state_dict(saved[key])


def load_safetensors(target: State, out: Path) -> None:
    path = str(out / "st.safetensors")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    model: dict[str, torch.Tensor] = {}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        top, rest = name.split(".", 1)
        if top == "model":
            model[rest] = t
        else:  # optimizer.state.<param id>.<key>
            _, pid, key = rest.split(".", 2)
            optim.setdefault(int(pid), {})[key] = t
    target["model"].load_state_dict(model)
    if "optimizer" in target:
        target["optimizer"].load_state_dict({"state": optim, "param_groups": json.loads(meta["param_groups"])})


def load_dcp(target: State, out: Path) -> None:
    state = dcp_state(target)
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    if "optimizer" in target:
        set_state_dict(target["model"], target["optimizer"], model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    else:
        set_model_state_dict(target["model"], state["model"])


LOADS: dict[str, tuple[Callable[[State, Template], Any], Callable[[Any, Path], None]]] = {
    "floor": (ready_floor, load_floor), "unbroken": (ready_target, load_unbroken),
    "torch.load": (ready_target, load_torch), "safetensors": (ready_target, load_safetensors),
    "dcp": (ready_target, load_dcp)}
SAVED_BY = {"floor": "floor", "unbroken": "unbroken", "torch.load": "torch.save", "safetensors": "safetensors",
            "dcp": "dcp"}


# -- warm-up -------------------------------------------------------------------------------------------------
def tiny(seed: int = 0, stepped: bool = True) -> State:
    torch.manual_seed(seed)
    model = nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    if stepped:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    return {"model": model, "optimizer": opt}


def warm_up(phase: str, method: str, where: Path) -> None:
    """Run the method once on a tiny state, so first-call costs (lazy imports, caches) stay untimed."""
    where.mkdir(parents=True, exist_ok=True)
    if phase == "stall":
        STALLS[method](tiny(), where, settle=0.0)
    elif phase == "save":
        SAVES[method](tiny(), where)
    else:
        SAVES[SAVED_BY[method]](tiny(), where)
        prepare, run = LOADS[method]
        run(prepare(tiny(1, stepped=False), tiny), where)
    shutil.rmtree(where)
