"""The privacy schedule a federation spec implies, and ε after each round.

The same function runs in two places, so they cannot disagree: the flow computes every
site's schedule from the sites' case counts before any process starts (and refuses a run
whose first round would already exceed the target), and each site computes its own from its
own data while it trains (and refuses a round that would exceed it).

dp-sgd at a site with N training cases, batch size B:
    sample rate q = 1 / ceil(N / B)           (Poisson sampling, as Opacus's DPDataLoader)
    steps per round = local_steps, or local_epochs * ceil(N / B)
    δ = privacy.delta, or 1 / N by default
client-dp for the federation (every site takes part in every round):
    q = 1, one Gaussian release per round, δ = privacy.delta (required)
The noise multiplier is ``privacy.noise_multiplier``, or derived (Opacus's
``get_noise_multiplier``) so that all ``rounds`` rounds together stay within ``target_epsilon``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sitekit.privacy.accountant import epsilon_for, noise_multiplier_for


@dataclass(frozen=True)
class Budget:
    mode: str  # dp-sgd | client-dp
    accountant: str
    noise_multiplier: float
    noise_derived: bool  # True: derived from target_epsilon
    clip: float
    delta: float
    delta_default: bool  # True: 1/N
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float | None
    noise_at: str

    def epsilon_after(self, rounds: int) -> float:
        """ε after ``rounds`` full rounds (0 rounds: 0)."""
        return epsilon_for([(self.noise_multiplier, self.sample_rate, rounds * self.steps_per_round)],
                           self.delta, self.accountant)

    def schedule(self) -> list[float]:
        """ε after round 1, 2, ..., ``rounds``."""
        return [self.epsilon_after(r) for r in range(1, self.rounds + 1)]

    def rounds_within_budget(self) -> int:
        """How many rounds fit in the target (all of them without a target); ε grows with every round."""
        if self.target_epsilon is None or self.epsilon_after(self.rounds) <= self.target_epsilon:
            return self.rounds
        lo, hi = 0, self.rounds  # ε(lo) <= target < ε(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid) <= self.target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def to_dict(self) -> dict:
        return asdict(self)


def _privacy_fields(privacy) -> dict:
    """Accept a PrivacySpec or the plain dict the plan carries."""
    return dict(privacy) if isinstance(privacy, dict) else asdict(privacy)


def site_budget(privacy, n_train: int, batch_size: int, epochs: int, local_steps: int | None, rounds: int) -> Budget:
    """A site's schedule under ``privacy`` (dp-sgd, or client-dp with noise added at the site)."""
    p = _privacy_fields(privacy)
    if n_train <= 0:
        raise ValueError("a site needs at least one training case")
    if p["mode"] == "client-dp":
        return federation_budget(p, rounds)
    batches = max(1, math.ceil(n_train / batch_size))
    q = 1.0 / batches
    steps = int(local_steps) if local_steps else int(epochs) * batches
    delta = p["delta"] if p.get("delta") is not None else 1.0 / n_train
    return _with_noise(p, delta, p.get("delta") is None, q, steps, rounds)


def federation_budget(privacy, rounds: int) -> Budget:
    """client-dp: the federation's schedule, one release of the (clipped) sum of site updates per round."""
    p = _privacy_fields(privacy)
    if p["mode"] != "client-dp":
        raise ValueError("the federation-level budget applies to client-dp only")
    return _with_noise(p, p["delta"], False, 1.0, 1, rounds)


def _with_noise(p: dict, delta: float, delta_default: bool, q: float, steps: int, rounds: int) -> Budget:
    derived = p.get("noise_multiplier") is None
    z = (noise_multiplier_for(p["target_epsilon"], delta, q, rounds * steps, p.get("accountant", "rdp"))
         if derived else float(p["noise_multiplier"]))
    return Budget(mode=p["mode"], accountant=p.get("accountant", "rdp"), noise_multiplier=z, noise_derived=derived,
                  clip=float(p["clip"]), delta=float(delta), delta_default=delta_default, sample_rate=q,
                  steps_per_round=steps, rounds=int(rounds), target_epsilon=p.get("target_epsilon"),
                  noise_at=p.get("noise_at", "site"))
