"""SCAFFOLD — Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020 (Algorithm 1, control-variate option II).

With x the global model, c the server control variate and c_i site i's own:

    local step (K of them, step size η_l):   y ← y − η_l * (g_i(y) − c_i + c)
    site variate after the round:          c_i⁺ = c_i − c + (x − y) / (K * η_l)
    site sends:                            Δy_i = y − x,   Δc_i = c_i⁺ − c_i
    server (S sites of N reporting):       x ← x + η_g * mean_i(Δy_i)
                                           c ← c + (|S| / N) * mean_i(Δc_i)

c_i never leaves the site except as Δc_i, and must survive a collaborator restart.
"""
from __future__ import annotations

import numpy as np


def corrected_gradient(grad: np.ndarray, c_site: np.ndarray, c_server: np.ndarray) -> np.ndarray:
    """g_i(y) − c_i + c: the drift-corrected gradient a site steps along."""
    return grad - c_site + c_server


def site_variate_update(c_site: np.ndarray, c_server: np.ndarray, x_global: np.ndarray, y_local: np.ndarray,
                        steps: int, lr: float) -> np.ndarray:
    """c_i⁺ = c_i − c + (x − y) / (K η_l)."""
    if steps <= 0 or lr <= 0:
        raise ValueError("SCAFFOLD needs at least one local step and a positive learning rate")
    return c_site - c_server + (x_global - y_local) / (steps * lr)


def server_update(x_global: np.ndarray, c_server: np.ndarray, delta_y: list[np.ndarray], delta_c: list[np.ndarray],
                  n_sites: int, server_lr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(x, c) after a round in which ``len(delta_y)`` of ``n_sites`` sites reported."""
    if not delta_y or len(delta_y) != len(delta_c):
        raise ValueError("need one Δy and one Δc per reporting site")
    x = x_global + server_lr * np.mean(delta_y, axis=0)
    c = c_server + (len(delta_c) / n_sites) * np.mean(delta_c, axis=0)
    return x, c


def server_variate_update(c_server: np.ndarray, delta_c: list[np.ndarray], n_sites: int) -> np.ndarray:
    """c ← c + (|S| / N) * mean_i(Δc_i), the server half of :func:`server_update`."""
    if not delta_c:
        raise ValueError("need one Δc per reporting site")
    return c_server + (len(delta_c) / n_sites) * np.mean(delta_c, axis=0)
