"""What the check scripts share: arguments, a Linear model, and batches drawn from the global torch RNG."""

import argparse

import torch
from torch import nn


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-interval", type=int, default=5)
    return p.parse_args()


def model_and_optimizer():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def get_batch():
    x = torch.randn(16, 8)
    return x, x.sum(dim=1, keepdim=True)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)
