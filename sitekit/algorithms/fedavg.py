"""FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017.

Server update, with n_k the number of training cases at site k and w_k its model after
local training:

    w_{t+1} = sum_k (n_k / n) * w_k,     n = sum_k n_k
"""
from __future__ import annotations

import numpy as np


def weighted_mean(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """sum_k (n_k / n) w_k for every tensor name; ``updates`` is [(weights, n_k), ...]."""
    if not updates:
        raise ValueError("no site updates to average")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError("site weights must sum to a positive number")
    names = updates[0][0].keys()
    return {name: sum((n / total) * np.asarray(w[name], dtype=np.float64) for w, n in updates).astype(updates[0][0][name].dtype)
            for name in names}
