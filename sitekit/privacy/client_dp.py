"""Client-level DP-FedAvg — McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018 (Algorithm 1, fixed-denominator estimator).

Each round, every site k turns its locally trained model w_k into a clipped update:

    Δ_k = w_k − w_t
    Δ_k ← Δ_k · min(1, S / ||Δ_k||)            ||·|| over all shared tensors together, S = clip_norm

and the new global model is

    w_{t+1} = w_t + (1/K) Σ_k Δ_k + N(0, (z S / K)² I)      noise_at: server
    w_{t+1} = w_t + (1/K) Σ_k (Δ_k + N(0, (z S)² I))        noise_at: site

with z = ``noise_multiplier`` and K the number of sites (all take part in every round, so
McMahan et al.'s weights w_k = 1, q = 1, W = K). Removing one site changes Σ_k Δ_k by at most
S, so each round is a Gaussian mechanism with noise multiplier z on that sum; the federation's
accountant composes one such release per round (sample rate 1).

- Equal weights, not case counts: count weights would give a large site a sensitivity above
  S/K and make the noise depend on the sites' sizes.
- ``noise_at: server`` trusts the aggregator (it sees every clipped update without noise);
  the guarantee protects each site from everyone who sees the global models.
- ``noise_at: site`` protects each site from the aggregator too: every update that leaves a
  site already carries noise z·S. Without secure aggregation (OpenFL 1.9 has none in this
  setup) each site must add the full noise, so the global model carries √K times the noise of
  ``server`` for the same ε.
- With few sites the noise dominates: its norm is about z·S·√d / K for d parameters, against a
  signal of at most S. Client-level DP is meant for federations of many sites.
"""
from __future__ import annotations

import secrets

import numpy as np
import torch


def update_norm(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    """||new − old|| over all the given tensors together."""
    sq = sum(float(((new[k].double() - old[k].double()) ** 2).sum()) for k in old)
    return float(np.sqrt(sq))


def clip_update(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``old + (new − old) · min(1, clip_norm / ||new − old||)`` for every tensor in ``old``; returns (clipped, norm before)."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = update_norm(new, old)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {k: (old[k].double() + (new[k].double() - old[k].double()) * scale).to(old[k].dtype) for k in old}
    return out, norm


def secret_rng() -> np.random.Generator:
    """A NumPy generator seeded from the OS's entropy (the federation's seed is public: never use it for noise)."""
    return np.random.default_rng(secrets.randbits(128))


def add_site_noise(tensors: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``noise_at: site``: every tensor plus independent N(0, std²) noise, std = z·S."""
    return {k: v + torch.normal(0.0, std, size=v.shape, generator=generator, dtype=torch.float64).to(v.dtype)
            for k, v in tensors.items()}


def noisy_mean(values: list[np.ndarray], n_sites: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """``noise_at: server``: Σ values / K + N(0, (noise_std / K)²), K = ``n_sites`` (fixed denominator),
    noise_std = z·S. With noise at the sites, call with ``noise_std=0``."""
    if n_sites <= 0:
        raise ValueError("n_sites must be positive")
    total = np.sum([np.asarray(v, dtype=np.float64) for v in values], axis=0)
    out = total / n_sites
    if noise_std > 0:
        out = out + rng.normal(0.0, noise_std / n_sites, size=out.shape)
    return out
