"""DP-SGD at a site — Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 — with Opacus 1.6.

Every optimiser step of a site's round:

    sample a batch by Poisson sampling: each training case independently with probability q
    g_i   = ∇ loss(x_i)                          per-example gradient (Opacus hooks)
    ĝ     = ( Σ_i g_i · min(1, C / ||g_i||)  +  N(0, σ² C² I) ) / (q N)
    w    ← optimiser step with ĝ                 (Adam, or SGD for SCAFFOLD)

C = ``max_grad_norm``, σ = ``noise_multiplier``. An empty Poisson batch still takes a
noise-only step: skipping it would reveal that no case was sampled.

How Opacus is wired in (why it looks like this):
- its hooks are attached to the site's own model (``wrap_model=False``) and removed after the
  round, so the model tree and its state-dict keys stay exactly those of the federation's
  model (no ``_module.`` prefix), and the next round starts clean;
- the noise and the sampling draw from a generator seeded from the operating system's
  entropy, never from the federation's seed: that seed is in the plan every participant
  holds, and noise anyone can regenerate protects nothing;
- terms that do not depend on the data (FedProx's proximal gradient, SCAFFOLD's correction)
  are added after the noise, through the optimiser's step hook; added to the loss they would
  be clipped per example and then overwritten by Opacus.
Opacus's floating-point noise is not hardened against the attacks its ``secure_mode`` (which
needs torchcsprng) addresses; see Mironov 2012.
"""
from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class DPRoundResult:
    loss: float  # mean loss over non-empty batches (stays at the site: it is a function of training data)
    steps: int  # noisy optimiser steps taken: what the accountant records
    seconds: float
    empty_batches: int


def secret_generator() -> torch.Generator:
    """A torch generator seeded from the OS's entropy (not reproducible by design)."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63))
    return g


def train_round_dp(model: torch.nn.Module, dataset, *, batch_size: int, optimizer: torch.optim.Optimizer,
                   loss_fn: Callable, noise_multiplier: float, max_grad_norm: float, steps: int,
                   generator: torch.Generator | None = None,
                   extra_gradient: Callable[[list[torch.Tensor]], list[torch.Tensor] | None] | None = None) -> DPRoundResult:
    """Train ``model`` in place for exactly ``steps`` DP-SGD steps on ``dataset``.

    ``optimizer`` is a plain torch optimiser over ``model.parameters()``; ``extra_gradient(params)``
    returns data-independent gradient terms added after the noise (or None).
    """
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import prepare_module
    from opacus.optimizers import DPOptimizer

    n = len(dataset)
    if n == 0:
        raise ValueError("DP-SGD needs at least one training case")
    generator = generator or secret_generator()
    batches = max(1, math.ceil(n / batch_size))
    sample_rate = 1.0 / batches
    expected_batch = max(1, int(n * sample_rate))  # what Opacus's make_private uses
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():  # Opacus's hooks fire on inputs that need no gradient: harmless, noisy
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        hooks = prepare_module(model, "hooks", wrap_model=False, batch_first=True, loss_reduction="mean")
    try:
        dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch, loss_reduction="mean", generator=generator)
        taken = [0]

        def after_noise(opt) -> None:
            taken[0] += 1
            if extra_gradient is not None:
                extra = extra_gradient(params)
                if extra is not None:
                    for p, e in zip(params, extra):
                        p.grad.add_(e)

        dp_opt.attach_step_hook(after_noise)
        loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
        model.train()
        t0, total, non_empty, empty = time.perf_counter(), 0.0, 0, 0
        while taken[0] < steps:
            before = taken[0]
            for x, y in loader:
                if taken[0] >= steps:
                    break
                dp_opt.zero_grad(set_to_none=True)
                if len(x) == 0:
                    empty += 1
                    for p in params:  # no example: zero clipped sum, the step is pure noise
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                else:
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss = loss_fn(model(x), y)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"the training loss became {float(loss)} at step {taken[0] + 1}; "
                                                     "lower 'learning_rate' in the federation spec")
                        loss.backward()
                    total += float(loss.detach())
                    non_empty += 1
                dp_opt.step()
            if taken[0] == before:
                raise RuntimeError("a DP-SGD pass over the data took no step")  # bounded: never loop for ever
        dp_opt.zero_grad(set_to_none=True)
        return DPRoundResult(total / max(non_empty, 1), taken[0], time.perf_counter() - t0, empty)
    finally:
        hooks.cleanup()
        for p in model.parameters():
            p.grad = None
