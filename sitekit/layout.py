"""Where a participant's files live in its folder: one home for the convention, importable without OpenFL.

The names follow what OpenFL 1.9 expects (``cert/client/col_<site>.*``, ``cert/server/agg_<host>.*``,
``cert/cert_chain.crt``), so the same folder serves ``sitekit keygen`` on a slim image and the
training engine (:mod:`sitekit.engine.openfl_adapter`, which re-exports :func:`participant_layout`).
"""
from __future__ import annotations

from pathlib import Path


def participant_layout(folder: Path, role: str, name: str) -> dict[str, Path]:
    """Key, CSR, certificate and CA-chain paths where OpenFL looks for them in a participant folder."""
    if role == "site":
        d, stem = folder / "cert" / "client", f"col_{name}"
    elif role == "aggregator":
        d, stem = folder / "cert" / "server", f"agg_{name.lower()}"
    else:
        raise ValueError(role)
    # Appended, never Path.with_suffix: a host such as aggregator.hospital.org has dots of its own.
    return {"key": d / f"{stem}.key", "csr": d / f"{stem}.csr", "cert": d / f"{stem}.crt",
            "chain": folder / "cert" / "cert_chain.crt"}
