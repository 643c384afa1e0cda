"""The states the issue-15 benchmarks checkpoint (per_tensor.py on the CPU, gpu_bench.py on a GPU).

  S      1,700 Linear(64, 64) + Adam after one step: 3,400 parameters, 13,600 tensors, 85 MB
  L      1 GiB of parameters in 64 float32 tensors of 16 MiB, no optimizer
  T      a GPT-2-small-like transformer (124M parameters, tied embedding) + AdamW after one step:
         148 parameters, 592 tensors, 1.49 GB; built from nn.Embedding/nn.Linear/nn.LayerNorm, no download
  G      2.4 GB in 96 float32 tensors of 25 MB (GPU benchmark), no optimizer
  <n>k   a sweep point: n,000 tensors in all = n,000/4 parameters of 16 float32 each + Adam state
         (exp_avg, exp_avg_sq, step per parameter), so every restore also rebuilds optimizer state

``build(spec, seed, stepped)``: ``stepped=True`` gives the state a training run saves (optimizer state
present); ``stepped=False`` gives the objects a resumed process restores into (a freshly initialised
model and an optimizer with no state yet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SPECS = ("S", "L", "T", "G")


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.attn_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2Small(nn.Module):
    """GPT-2 small's shapes: 12 layers, width 768, 12 heads, vocabulary 50,257, 1,024 positions."""

    def __init__(self, layers: int = 12, width: int = 768, heads: int = 12, vocab: int = 50257,
                 positions: int = 1024) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied output head, as in GPT-2


def sweep_tensors(spec: str) -> int | None:
    """The tensor count of a sweep spec ('4k' -> 4000), None for a named workload."""
    if spec.endswith("k") and spec[:-1].isdigit():
        return int(spec[:-1]) * 1000
    return None


def _params(count: int, shape: tuple[int, ...]) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(torch.empty(shape).uniform_(-1, 1)) for _ in range(count))


def build(spec: str, seed: int = 0, stepped: bool = True, device: str = "cpu") -> dict[str, Any]:
    torch.manual_seed(seed)
    with torch.device(device):
        n = sweep_tensors(spec)
        if spec == "L":
            return {"model": _params(64, (2048, 2048))}
        if spec == "G":
            return {"model": _params(96, (2500, 2500))}
        if spec == "S":
            model: nn.Module = nn.ModuleList(nn.Linear(64, 64) for _ in range(1700))
        elif spec == "T":
            model = GPT2Small()
        elif n is not None:
            if n % 4:
                raise ValueError(f"sweep spec {spec}: the tensor count must be a multiple of 4 (param + 3 Adam)")
            model = _params(n // 4, (16,))
        else:
            raise ValueError(f"unknown workload {spec!r}: one of {', '.join(SPECS)} or <n>k (e.g. 4k)")
        opt = (torch.optim.AdamW if spec == "T" else torch.optim.Adam)(model.parameters(), lr=1e-3)
    if stepped:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
        opt.step()
        for p in model.parameters():
            p.grad = None
    return {"model": model, "optimizer": opt}


def describe(spec: str) -> str:
    n = sweep_tensors(spec)
    if n is not None:
        return f"sweep {spec}: {n // 4:,} parameters of 16 float32 + Adam state"
    return {"S": "Workload S: 1,700 Linear(64, 64) + Adam", "L": "Workload L: 64 float32 tensors of 16 MiB",
            "T": "Workload T: GPT-2-small-like (124M parameters) + AdamW",
            "G": "Workload G: 96 float32 tensors of 25 MB"}[spec]


def param_count(state: dict[str, Any]) -> int:
    return sum(p.numel() for p in state["model"].parameters())


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"

