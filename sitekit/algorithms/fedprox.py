"""FedProx — Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

Each site k minimises its loss plus a proximal term that keeps it near the global model w_t:

    min_w  F_k(w) + (mu / 2) * ||w - w_t||^2

so every local gradient step gains  mu * (w - w_t).  The server aggregates as FedAvg.
mu = 0 is FedAvg exactly.
"""
from __future__ import annotations

import torch


class ProximalTerm:
    """Holds w_t (a frozen copy of the global weights at the start of the round)."""

    def __init__(self, model: torch.nn.Module, mu: float):
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        """(mu / 2) * ||w - w_t||^2, to be added to the site's loss."""
        if self.mu == 0:
            return torch.zeros(())
        sq = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))
        return 0.5 * self.mu * sq
