"""Consistency distillation (after openai/consistency_models, ``cm_train.py``) with unbroken.

A small convolutional denoiser is distilled from a frozen teacher: noise an image to level
t_{n+1}, take one Euler step of the teacher's probability-flow ODE down to t_n, and train the
student so that its output at (x_{t_{n+1}}, t_{n+1}) matches the target model's output at
(x_{t_n}, t_n). As in the original, the run carries:

  * ``model``            the online student, trained with RAdam;
  * ``ema_<rate>``       EMA copies, one per ``--ema_rate`` entry. The first is a
                         ``torch.optim.swa_utils.AveragedModel``, the others plain module copies
                         updated by hand: unbroken captures both;
  * ``target_model``     a frozen EMA of the student (rate ``--target_ema``), the distillation target;
  * ``optimizer``        with the learning rate annealed by hand (``--lr_anneal_steps``), as in
                         ``TrainLoop._anneal_lr``.

The teacher is not checkpointed: like a pre-trained teacher loaded from its own file, it is
rebuilt identically on every start (here from ``--teacher_seed``).

Every step draws noise levels and Gaussian noise from the GLOBAL torch RNG, so a resume is exact
only because unbroken restores it.

    python examples/consistency_distill.py --run-dir runs/cd --steps 40 --save_interval 5

Output: ``resumed from step <k>`` once, then ``step <n> loss <float.hex(loss)>`` per completed step.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import unbroken


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Consistency distillation with crash-safe exact resume.")
    p.add_argument("--run-dir", required=True, help="checkpoint directory (created if missing)")
    p.add_argument("--steps", "--total_training_steps", dest="steps", type=int, default=40)
    p.add_argument("--save_interval", "--save-interval", dest="save_interval", type=int, default=10)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher_seed", type=int, default=1234)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dataset_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr_anneal_steps", type=int, default=0, help="0: no annealing")
    p.add_argument("--ema_rate", default="0.999,0.9999", help="comma-separated EMA rates")
    p.add_argument("--target_ema", type=float, default=0.95)
    p.add_argument("--num_scales", type=int, default=18)
    p.add_argument("--sigma_min", type=float, default=0.002)
    p.add_argument("--sigma_max", type=float, default=80.0)
    p.add_argument("--sigma_data", type=float, default=0.5)
    p.add_argument("--rho", type=float, default=7.0)
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Seed every global RNG so that a fresh run is deterministic; restore() overrides this."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Denoiser(nn.Module):
    """A tiny conv net F(x, t): two conv layers with a timestep embedding added in between."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(16, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.norm = nn.GroupNorm(4, channels)
        self.mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x, t):
        half = 8
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=x.dtype) / half)
        ang = t[:, None] * freqs[None]
        emb = self.temb(torch.cat([ang.sin(), ang.cos()], dim=1))
        h = F.silu(self.inp(x)) + emb[:, :, None, None]
        h = F.silu(self.mid(F.silu(self.norm(h))))
        return self.out(h)


class Diffusion:
    """Karras et al. preconditioning and noise schedule, as in ``cm/karras_diffusion.py``."""

    def __init__(self, args):
        self.a = args

    def sigmas(self, idx):
        a = self.a
        lo, hi = a.sigma_min ** (1 / a.rho), a.sigma_max ** (1 / a.rho)
        return (hi + idx / (a.num_scales - 1) * (lo - hi)) ** a.rho

    def denoise(self, net, x_t, sigma):
        a = self.a
        s = sigma[:, None, None, None]
        c_skip = a.sigma_data ** 2 / ((s - a.sigma_min) ** 2 + a.sigma_data ** 2)
        c_out = (s - a.sigma_min) * a.sigma_data / (s ** 2 + a.sigma_data ** 2) ** 0.5
        c_in = 1 / (s ** 2 + a.sigma_data ** 2) ** 0.5
        rescaled_t = 1000 * 0.25 * torch.log(sigma + 1e-44)
        return c_skip * x_t + c_out * net(c_in * x_t, rescaled_t)

    def cd_loss(self, model, target_model, teacher, x0):
        """Consistency distillation loss with an Euler teacher step; noise from the global RNG."""
        a = self.a
        n = torch.randint(0, a.num_scales - 1, (x0.shape[0],))
        t, t2 = self.sigmas(n.to(x0.dtype)), self.sigmas((n + 1).to(x0.dtype))
        x_t = x0 + torch.randn_like(x0) * t[:, None, None, None]
        with torch.no_grad():
            d = (x_t - self.denoise(teacher, x_t, t)) / t[:, None, None, None]
            x_t2 = x_t + d * (t2 - t)[:, None, None, None]
            target = self.denoise(target_model, x_t2, t2)
        distiller = self.denoise(model, x_t, t)
        return ((distiller - target) ** 2).mean()


def make_dataset(seed: int, n: int, size: int):
    """Fixed synthetic 'images' (soft blobs in [-1, 1]) from their own generator."""
    g = torch.Generator().manual_seed(20_000 + seed)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centers = torch.rand(n, 2, generator=g) * 1.6 - 0.8
    widths = torch.rand(n, 1, 1, generator=g) * 0.3 + 0.2
    d2 = (xx[None] - centers[:, 0, None, None]) ** 2 + (yy[None] - centers[:, 1, None, None]) ** 2
    return (torch.exp(-d2 / widths ** 2) * 2 - 1)[:, None]


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@torch.no_grad()
def update_ema(target_params, source_params, rate: float) -> None:
    """``cm/nn.py:update_ema``: target = rate * target + (1 - rate) * source."""
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    seed_everything(args.seed)

    data = make_dataset(args.seed, args.dataset_size, args.image_size)
    steps_per_epoch = args.dataset_size // args.batch_size
    diffusion = Diffusion(args)

    # The "pre-trained" teacher: rebuilt identically each start, never trained, not checkpointed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.teacher_seed)
        teacher = Denoiser().requires_grad_(False).eval()

    model = Denoiser()
    target_model = copy.deepcopy(model).requires_grad_(False)
    rates = [float(r) for r in args.ema_rate.split(",") if r]
    emas = {}
    for i, rate in enumerate(rates):
        if i == 0:
            emas[rate] = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(rate))
        else:
            emas[rate] = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.RAdam(model.parameters(), lr=args.lr, weight_decay=0.0)

    hparams = {k: v for k, v in vars(args).items() if k != "run_dir"}  # the path is not a hparam
    state = {"model": model, "target_model": target_model, "optimizer": opt, "args": dict(hparams)}
    state.update({f"ema_{rate}": ema for rate, ema in emas.items()})
    state["epoch"] = 0

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
        assert state["epoch"] == start // steps_per_epoch, (state["epoch"], start)

        order, order_epoch = None, None
        for step in range(start, args.steps):
            epoch, pos = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(args.seed, epoch, args.dataset_size), epoch
            x0 = data[order[pos * args.batch_size:(pos + 1) * args.batch_size]]

            if args.lr_anneal_steps:  # TrainLoop._anneal_lr: a pure function of the step
                for group in opt.param_groups:
                    group["lr"] = args.lr * (1 - step / args.lr_anneal_steps)

            loss = diffusion.cd_loss(model, target_model, teacher, x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

            for i, (rate, ema) in enumerate(emas.items()):
                if i == 0:
                    ema.update_parameters(model)
                else:
                    update_ema(ema.parameters(), model.parameters(), rate)
            update_ema(target_model.parameters(), model.parameters(), args.target_ema)

            value = loss.item()
            print(f"step {step + 1} loss {value.hex()}", flush=True)
            state["epoch"] = (step + 1) // steps_per_epoch
            ckpt.step(step + 1, metrics={"loss": value})


if __name__ == "__main__":
    main()
