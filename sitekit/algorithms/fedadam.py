"""FedAdam — Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2, FedAdam).

The server treats the sites' averaged change as a pseudo-gradient and takes an Adam step:

    Δ_t = sum_k (n_k / n) * (w_k - x_t)                        (x_t: current global model)
    m_t = β1 * m_{t-1} + (1 - β1) * Δ_t
    v_t = β2 * v_{t-1} + (1 - β2) * Δ_t²
    x_{t+1} = x_t + η * m_t / (sqrt(v_t) + τ)

No bias correction (as in the paper). m starts at 0 and v at τ² (the paper's v_{-1} ≥ τ²).
Sites train as in FedAvg. The state (m, v) must survive an aggregator restart:
:meth:`FedAdam.state` / :meth:`FedAdam.load`. FedYogi (:mod:`sitekit.algorithms.fedyogi`)
differs only in the second moment.
"""
from __future__ import annotations

import numpy as np


class FedAdam:
    """Server-side Adam over tensors keyed by name (NumPy arrays)."""

    name = "fedadam"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """v_t from v_{t-1} and Δ_t²: Adam's exponential moving average."""
        return self.beta2 * v + (1 - self.beta2) * d2

    def step(self, name: str, current: np.ndarray, averaged: np.ndarray) -> np.ndarray:
        """New global value of one tensor from the current global and the sites' weighted average."""
        x = np.asarray(current, dtype=np.float64)
        delta = np.asarray(averaged, dtype=np.float64) - x
        m = self.m.get(name, np.zeros_like(x))
        v = self.v.get(name, np.full_like(x, self.tau ** 2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.second_moment(v, delta * delta)
        self.m[name], self.v[name] = m, v
        return (x + self.lr * m / (np.sqrt(v) + self.tau)).astype(np.asarray(current).dtype)

    def state(self) -> dict[str, np.ndarray]:
        out = {f"m/{k}": a for k, a in self.m.items()}
        out.update({f"v/{k}": a for k, a in self.v.items()})
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(a) for k, a in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(a) for k, a in state.items() if k.startswith("v/")}
