"""GPT-style pre-training (after MiniMind's ``train_pretrain.py``) with unbroken.

A tiny causal language model (token + position embeddings, pre-norm transformer blocks with causal
self-attention, a head tied to the embedding) is pre-trained on synthetic token sequences with the
usual ingredients of such a script:

  * AdamW, a warmup + cosine ``LambdaLR`` schedule, gradient accumulation, gradient clipping;
  * bf16 ``torch.autocast`` with a ``torch.amp.GradScaler`` (its scale and growth tracker are
    training state too: with ``--scaler_growth_interval`` small the scale changes during a short run);
  * dropout in attention and residual paths, drawn from the GLOBAL torch RNG;
  * the parsed ``args`` kept as a plain dict in the checkpoint (and in its metadata).

Where MiniMind saves ``{'model', 'optimizer', 'scaler', 'epoch', 'step', 'args'}`` with torch.save
and resumes by hand, here one ``CheckpointManager`` does it, crash-safely, RNG included.

    python examples/gpt_pretrain.py --run-dir runs/gpt --steps 40 --save_interval 5

Output: ``resumed from step <k>`` once, then ``step <n> loss <float.hex(loss)>`` per completed step.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import unbroken


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Tiny GPT pre-training with crash-safe exact resume.")
    p.add_argument("--run-dir", "--save_dir", dest="run_dir", required=True,
                   help="checkpoint directory (created if missing)")
    p.add_argument("--steps", type=int, default=40, help="total optimizer steps")
    p.add_argument("--save_interval", "--save-interval", dest="save_interval", type=int, default=10)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab_size", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--num_sequences", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--accumulation_steps", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--warmup_iters", type=int, default=5)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="autocast dtype; float32 disables autocast")
    p.add_argument("--scaler_growth_interval", type=int, default=8)
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Seed every global RNG so that a fresh run is deterministic; restore() overrides this."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = Attention(dim, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.SiLU(),
                                 nn.Linear(4 * dim, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.tok = nn.Embedding(args.vocab_size, args.dim)
        self.pos = nn.Embedding(args.max_seq_len, args.dim)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(args.dim, args.n_heads, args.dropout)
                                    for _ in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied, as in MiniMind
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1])
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def make_corpus(seed: int, n: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Fixed synthetic token sequences from a random sparse Markov chain (learnable structure)."""
    g = torch.Generator().manual_seed(30_000 + seed)
    logits = torch.randn(vocab, vocab, generator=g) * 3
    probs = torch.softmax(logits, dim=1)
    seqs = torch.empty(n, seq_len + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for i in range(1, seq_len + 1):
        seqs[:, i] = torch.multinomial(probs[seqs[:, i - 1]], 1, generator=g).squeeze(1)
    return seqs


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    seed_everything(args.seed)

    corpus = make_corpus(args.seed, args.num_sequences, args.max_seq_len, args.vocab_size)
    micro_per_epoch = args.num_sequences // args.batch_size  # micro-batches per epoch (drop_last)

    model = TinyGPT(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.warmup_iters, args.steps))
    use_autocast = args.dtype == "bfloat16"
    # bf16 needs no loss scaling, but MiniMind-style scripts keep a GradScaler for the fp16 case;
    # it is enabled here so that its state (scale, growth tracker) is exercised by the checkpoint.
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 10,
                                  growth_interval=args.scaler_growth_interval)

    hparams = {k: v for k, v in vars(args).items() if k != "run_dir"}  # the path is not a hparam
    state = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler,
             "epoch": 0, "args": dict(hparams)}

    ckpt = unbroken.CheckpointManager(
        args.run_dir, state=state, every_steps=args.save_interval, keep_last=args.keep_last,
        metadata={"args": vars(args)},
    )
    with ckpt:
        start = ckpt.restore()
        print(f"resumed from step {start}", flush=True)
        if state["args"] != hparams:  # e.g. relaunched with more --steps: say so, save the new ones
            old = state["args"]
            changed = sorted(k for k in old.keys() | hparams.keys() if old.get(k) != hparams.get(k))
            print("note: arguments changed since the checkpoint: " + ", ".join(
                f"{k} {old.get(k)!r} -> {hparams.get(k)!r}" for k in changed), file=sys.stderr)
            state["args"] = dict(hparams)
        assert state["epoch"] == start * args.accumulation_steps // micro_per_epoch, (state["epoch"], start)

        model.train()
        order, order_epoch = None, None
        for step in range(start, args.steps):
            total = 0.0
            for micro in range(args.accumulation_steps):
                # The data position is a pure function of (step, micro): no loader state needed.
                epoch, pos = divmod(step * args.accumulation_steps + micro, micro_per_epoch)
                if order_epoch != epoch:
                    order, order_epoch = epoch_order(args.seed, epoch, args.num_sequences), epoch
                batch = corpus[order[pos * args.batch_size:(pos + 1) * args.batch_size]]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                    loss = model(batch[:, :-1], batch[:, 1:]) / args.accumulation_steps
                scaler.scale(loss).backward()
                total += loss.item()

            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()

            print(f"step {step + 1} loss {total.hex()}", flush=True)
            state["epoch"] = (step + 1) * args.accumulation_steps // micro_per_epoch
            ckpt.step(step + 1, metrics={"loss": total, "lr": sched.get_last_lr()[0]})


if __name__ == "__main__":
    main()
