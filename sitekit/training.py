"""Training and evaluation loops shared by federated rounds and local-only baselines.

Keeping one loop for both is what makes the comparison fair: a local-only model gets the
same optimiser, loss, batch size and number of steps as a site gets inside the federation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class EpochResult:
    loss: float
    steps: int
    seconds: float


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=False)


def make_optimizer(model: torch.nn.Module, lr: float, kind: str = "adam") -> torch.optim.Optimizer:
    if kind == "sgd":  # SCAFFOLD's control variates are defined for plain SGD steps
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_round(model, loaders, optimizer, loss_fn, *, epochs: int = 1, steps: int | None = None,
                prox=None, correction: list[torch.Tensor] | None = None) -> EpochResult:
    """One site's local training: ``epochs`` passes, or exactly ``steps`` optimiser steps.

    ``loaders`` yields a fresh (reshuffled) loader per pass. ``prox`` (FedProx) adds its term to
    the loss; ``correction`` (SCAFFOLD: c - c_i per parameter) is added to every gradient.
    """
    model.train()
    t0, total, done, passes = time.perf_counter(), 0.0, 0, 0
    params = [p for p in model.parameters()]
    while (steps is None and passes < epochs) or (steps is not None and done < steps):
        seen = 0
        for x, y in next(loaders):
            if steps is not None and done >= steps:
                break
            seen += 1
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {float(loss)} at step {done + 1}; "
                                         "lower 'learning_rate' in the federation spec")
            objective = loss + prox(model) if prox is not None else loss
            objective.backward()
            if correction is not None:
                for p, c in zip(params, correction):
                    if p.grad is not None:
                        p.grad.add_(c)
            optimizer.step()
            total += float(loss.detach())
            done += 1
        passes += 1
        if seen == 0:
            break  # an empty loader would otherwise loop for ever
    return EpochResult(total / max(done, 1), done, time.perf_counter() - t0)
