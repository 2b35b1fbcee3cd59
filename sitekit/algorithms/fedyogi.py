"""FedYogi — Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2, FedYogi),
with Yogi's second moment from Zaheer et al., "Adaptive Methods for Nonconvex Optimization",
NeurIPS 2018.

As FedAdam (:mod:`sitekit.algorithms.fedadam`), except that v grows or shrinks additively,
so a few large pseudo-gradients cannot inflate it for long:

    Δ_t = sum_k (n_k / n) * (w_k - x_t)
    m_t = β1 * m_{t-1} + (1 - β1) * Δ_t
    v_t = v_{t-1} - (1 - β2) * Δ_t² * sign(v_{t-1} - Δ_t²)
    x_{t+1} = x_t + η * m_t / (sqrt(v_t) + τ)

OpenFL 1.9's own ``YogiAdaptiveAggregation`` is broken (a keyword typo), hence this module.
"""
from __future__ import annotations

import numpy as np

from sitekit.algorithms.fedadam import FedAdam


class FedYogi(FedAdam):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)
