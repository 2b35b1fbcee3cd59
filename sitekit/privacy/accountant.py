"""A privacy accountant that survives restarts.

Both mechanisms fedward uses are compositions of the (Poisson-)subsampled Gaussian
mechanism, described by a history of ``(noise_multiplier, sample_rate, steps)``:

- dp-sgd at a site: one entry per round, ``sample_rate`` = 1 / (batches per epoch), one step
  per noisy optimiser step (Opacus's DPOptimizer);
- client-dp for the federation: one step per round, ``sample_rate`` = 1 (every site takes part).

ε for a δ is computed by Opacus's accountants from that history, never by code of ours:
``rdp`` (Rényi DP, Mironov 2017, with the conversion of Balle et al. 2020) or ``prv``
(privacy random variables, Gopi et al. 2021, tighter). The history is stored as JSON next to
the party that spent the budget (a site's ``site_state/privacy.json``), written atomically
after every round, so a restarted collaborator continues from what it had spent.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ACCOUNTANTS = ("rdp", "prv")


class AccountantMismatch(ValueError):
    """A persisted accountant was written with another kind of accountant."""


def _opacus(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {kind!r}; choose one of {', '.join(ACCOUNTANTS)}")


def _merge(entries) -> list[tuple[float, float, int]]:
    """Opacus's history form, consecutive entries with the same mechanism merged (PRV is costly per entry)."""
    out: list[tuple[float, float, int]] = []
    for z, q, n in entries:
        if n <= 0:
            continue
        if out and out[-1][0] == z and out[-1][1] == q:
            out[-1] = (z, q, out[-1][2] + int(n))
        else:
            out.append((float(z), float(q), int(n)))
    return out


def epsilon_for(history, delta: float, kind: str = "rdp") -> float:
    """ε spent by a composition of subsampled Gaussian mechanisms ``[(noise_multiplier, sample_rate, steps)]``."""
    merged = _merge(history)
    if not merged:
        return 0.0
    if any(z <= 0 for z, _, _ in merged):
        return float("inf")
    acc = _opacus(kind)
    acc.history = merged
    return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's search tolerance) that keeps ``steps`` steps within the target."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=int(steps), accountant=kind, epsilon_tolerance=0.01))


@dataclass
class Release:
    """One round's noisy releases: ``steps`` applications of the Gaussian mechanism."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyAccountant:
    """What one party has spent; ``path`` makes it persistent (JSON, atomic writes)."""

    def __init__(self, kind: str = "rdp", path: str | Path | None = None):
        if kind not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {kind!r}; choose one of {', '.join(ACCOUNTANTS)}")
        self.kind = kind
        self.path = Path(path) if path is not None else None
        self.releases: list[Release] = []

    @classmethod
    def load(cls, path: str | Path, kind: str = "rdp") -> "PrivacyAccountant":
        """The accountant stored at ``path``, or a fresh one if nothing has been spent there yet."""
        acc = cls(kind, path)
        p = Path(path)
        if p.exists():
            saved = json.loads(p.read_text())
            if saved.get("accountant") != kind:
                raise AccountantMismatch(f"{p} was written by the {saved.get('accountant')!r} accountant, not {kind!r}; "
                                         "keep the accountant of a running federation unchanged")
            acc.releases = [Release(int(e["round"]), float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                            for e in saved["releases"]]
        return acc

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.releases)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return _merge(r.as_tuple() for r in self.releases)

    def record(self, round_number: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add one round's releases and, if persistent, write the file before anything leaves the site."""
        if steps < 0 or not 0 < sample_rate <= 1 or noise_multiplier < 0:
            raise ValueError(f"invalid release: noise {noise_multiplier}, sample rate {sample_rate}, steps {steps}")
        self.releases.append(Release(int(round_number), float(noise_multiplier), float(sample_rate), int(steps)))
        if self.path is not None:
            self.save()

    def epsilon(self, delta: float) -> float:
        """ε spent so far at this δ."""
        return epsilon_for(self.history, delta, self.kind)

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε if ``steps`` more steps of that mechanism were spent (nothing is recorded)."""
        return epsilon_for([*self.history, (noise_multiplier, sample_rate, steps)], delta, self.kind)

    def save(self) -> None:
        if self.path is None:
            raise ValueError("this accountant has no file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"accountant": self.kind, "updated": time.time(), "steps": self.steps,
                "releases": [vars(r) for r in self.releases]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # the spent budget must survive a power cut, not only a crash
        os.replace(tmp, self.path)
