"""Training and evaluation loops shared by federated rounds and local-only baselines.

Keeping one loop for both is what makes the comparison fair: a local-only model gets the
same optimiser, loss, batch size and number of steps as a site gets inside the federation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sitekit.model import dice_score


@dataclass
class EpochResult:
    loss: float
    steps: int
    seconds: float


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=False)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_epoch(model, loader, optimizer, loss_fn) -> EpochResult:
    model.train()
    t0, total, steps = time.perf_counter(), 0.0, 0
    for image, mask in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {float(loss)} at step {steps + 1}; "
                                     "lower 'learning_rate' in the federation spec")
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return EpochResult(total / max(steps, 1), steps, time.perf_counter() - t0)


@torch.no_grad()
def evaluate_dice(model, dataset, batch_size: int = 2) -> float:
    """Mean per-case brain-mask Dice over a dataset."""
    model.eval()
    scores = []
    for image, mask in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        scores.append(dice_score(model(image), mask))
    return float(torch.cat(scores).mean())
