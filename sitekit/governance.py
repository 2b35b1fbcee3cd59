"""Governance on record per site: who is the controller, on what lawful basis, under which agreements.

Under the GDPR a federation is still processing of special-category health data whenever its
updates could be linked to patients, so before a single update leaves a hospital fedward wants,
for every site, in the federation spec::

    sites:
      - name: hospital-a
        data: ...
        governance:
          controller: St Example University Hospital NHS Trust
          role: joint_controller          # controller | joint_controller | processor
          lawful_basis: {art6: e, art9: j}  # GDPR Art. 6(1)(e) and Art. 9(2)(j)
          dpa: {reference: DPA-2026-014, date: 2026-02-01, valid_until: 2028-01-31}
          dpia: {reference: DPIA-2026-003, date: 2026-01-20}
          data_use: Training and evaluating a brain-mask segmentation model; no re-identification.

Two checks, on purpose at two moments:

- *form* when the spec is read (:func:`parse_site_governance`, called by ``sitekit.spec``): a value
  that is there must be well formed (a known role, an Article 6(1) letter a-f, an Article 9(2)
  letter a-j, dates written YYYY-MM-DD, an agreement that ends after it starts, no unknown keys).
  A spec drafted while the paperwork is still being signed can be validated this way.
- *completeness and currency* before anything is shipped to a site or any round starts
  (:func:`check_site_governance` / :func:`require`): every item present, no agreement dated in
  the future, none expired. That depends on the day, so it is checked on the day, every time.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

ROLES = ("controller", "joint_controller", "processor")

# GDPR Article 6(1): lawful bases for processing.
ART6 = {
    "a": "consent of the data subject",
    "b": "performance of a contract with the data subject",
    "c": "compliance with a legal obligation of the controller",
    "d": "protection of vital interests",
    "e": "a task carried out in the public interest or in the exercise of official authority",
    "f": "legitimate interests pursued by the controller or a third party",
}
# GDPR Article 9(2): conditions for processing special categories of data (health data).
ART9 = {
    "a": "explicit consent of the data subject",
    "b": "obligations in employment, social security and social protection law",
    "c": "vital interests of a data subject incapable of giving consent",
    "d": "legitimate activities of a not-for-profit body",
    "e": "data manifestly made public by the data subject",
    "f": "establishment, exercise or defence of legal claims",
    "g": "reasons of substantial public interest",
    "h": "preventive or occupational medicine, medical diagnosis, the provision of health or social care",
    "i": "reasons of public interest in the area of public health",
    "j": "archiving in the public interest, scientific or historical research or statistics (Art. 89(1))",
}

# What check_site_governance asks for, in the order a DPO reads it: (field path, what it is).
ITEMS = (
    ("controller", "controller name"),
    ("role", "controller role (controller, joint_controller or processor)"),
    ("lawful_basis.art6", "GDPR Article 6(1) lawful basis"),
    ("lawful_basis.art9", "GDPR Article 9(2) condition for health data"),
    ("dpa.reference", "data processing agreement reference"),
    ("dpa.date", "data processing agreement date"),
    ("dpia.reference", "DPIA reference"),
    ("dpia.date", "DPIA date"),
    ("data_use", "data-use scope"),
)

_GOV = {"controller": False, "role": False, "lawful_basis": False, "dpa": False, "dpia": False, "data_use": False}
_BASIS = {"art6": False, "art9": False}
_DPA = {"reference": False, "date": False, "valid_until": False}
_DPIA = {"reference": False, "date": False}
# "e", "(e)", "6(1)(e)", "Art. 6(1)(e)", "GDPR Article 6(1)(e)" all mean letter e.
_LETTER6 = re.compile(r"^\s*(?:(?:gdpr\s+)?(?:art(?:icle)?\.?\s*)?6\s*\(\s*1\s*\)\s*)?\(?\s*([a-z])\s*\)?\s*$", re.I)
_LETTER9 = re.compile(r"^\s*(?:(?:gdpr\s+)?(?:art(?:icle)?\.?\s*)?9\s*\(\s*2\s*\)\s*)?\(?\s*([a-z])\s*\)?\s*$", re.I)
MAX_TEXT = 500


class GovernanceError(ValueError):
    """A site lacks a governance item, or one is not in force today; the message names site, file and field."""


@dataclass(frozen=True)
class Agreement:
    """A signed document on record: its reference, the date it was signed, and (DPA) its last valid day."""

    reference: str | None = None
    date: dt.date | None = None
    valid_until: dt.date | None = None  # inclusive: the agreement still applies on this day


@dataclass(frozen=True)
class SiteGovernance:
    controller: str | None = None
    role: str | None = None
    art6: str | None = None  # one letter, a-f
    art9: str | None = None  # one letter, a-j
    dpa: Agreement | None = None
    dpia: Agreement | None = None
    data_use: str | None = None

    def value(self, path: str) -> Any:
        """The value at an ITEMS path such as ``dpa.date`` (None when absent)."""
        head, _, tail = path.partition(".")
        if head == "lawful_basis":
            return getattr(self, tail)
        v = getattr(self, head)
        return getattr(v, tail) if tail and v is not None else v

    def lawful_basis_text(self) -> str:
        """E.g. ``Art. 6(1)(e) (a task carried out in the public interest ...); Art. 9(2)(j) (...)``."""
        a6 = f"Art. 6(1)({self.art6}) ({ART6[self.art6]})" if self.art6 else "Art. 6(1): not on record"
        a9 = f"Art. 9(2)({self.art9}) ({ART9[self.art9]})" if self.art9 else "Art. 9(2): not on record"
        return f"{a6}; {a9}"

    def record(self) -> dict:
        """A plain view for the audit log, the DPIA annex and MLflow (references and dates, no free text beyond scope)."""
        def agreement(a: Agreement | None) -> dict | None:
            if a is None:
                return None
            out = {"reference": a.reference, "date": a.date.isoformat() if a.date else None}
            if a.valid_until:
                out["valid_until"] = a.valid_until.isoformat()
            return out

        return {"controller": self.controller, "role": self.role, "art6": self.art6, "art9": self.art9,
                "dpa": agreement(self.dpa), "dpia": agreement(self.dpia), "data_use": self.data_use}


# --------------------------------------------------------------------------- form (spec parse)

def parse_site_governance(r, raw: Any, where: str) -> SiteGovernance | None:
    """Check the form of a site's ``governance`` block; ``r`` is the spec reader (its ``fail`` names file and field).

    Absent items are allowed here; :func:`check_site_governance` refuses them before anything runs."""
    if raw is None:
        return None
    where = f"{where}.governance"
    g = r.mapping(raw, where, _GOV)
    basis = r.mapping(g.get("lawful_basis") or {}, f"{where}.lawful_basis", _BASIS)
    role = g.get("role")
    if role is not None:
        if role == "joint controller":
            role = "joint_controller"
        r.choice(role, f"{where}.role", ROLES)
    dpa = dpia = None
    if g.get("dpa") is not None:
        d = r.mapping(g["dpa"], f"{where}.dpa", _DPA)
        dpa = Agreement(_text(r, d.get("reference"), f"{where}.dpa.reference", 200),
                        _date(r, d.get("date"), f"{where}.dpa.date"),
                        _date(r, d.get("valid_until"), f"{where}.dpa.valid_until"))
        if dpa.date and dpa.valid_until and dpa.valid_until < dpa.date:
            raise r.fail(f"{where}.dpa.valid_until", f"is {dpa.valid_until.isoformat()}, before the agreement's date "
                         f"{dpa.date.isoformat()}; check both dates against the signed agreement.")
    if g.get("dpia") is not None:
        d = r.mapping(g["dpia"], f"{where}.dpia", _DPIA)
        dpia = Agreement(_text(r, d.get("reference"), f"{where}.dpia.reference", 200),
                         _date(r, d.get("date"), f"{where}.dpia.date"))
    return SiteGovernance(
        controller=_text(r, g.get("controller"), f"{where}.controller", 200),
        role=role,
        art6=_letter(r, basis.get("art6"), f"{where}.lawful_basis.art6", _LETTER6, ART6, "Article 6(1)"),
        art9=_letter(r, basis.get("art9"), f"{where}.lawful_basis.art9", _LETTER9, ART9, "Article 9(2)"),
        dpa=dpa, dpia=dpia,
        data_use=_text(r, g.get("data_use"), f"{where}.data_use", MAX_TEXT),
    )


def _text(r, value: Any, where: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise r.fail(where, f"must be text, got {type(value).__name__}.")
    value = " ".join(str(value).split())
    if not value:
        return None
    if len(value) > limit:
        raise r.fail(where, f"is {len(value)} characters long; keep it to {limit} (a reference, not the document).")
    return value


def _date(r, value: Any, where: str) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime) or not isinstance(value, (dt.date, str)):
        raise r.fail(where, f"must be a date written YYYY-MM-DD, got {value!r}.")
    if isinstance(value, str):
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
                raise ValueError
            value = dt.date.fromisoformat(value.strip())
        except ValueError:
            raise r.fail(where, f"must be a date written YYYY-MM-DD, got {value!r}.") from None
    return value


def _letter(r, value: Any, where: str, pattern: re.Pattern, table: dict, article: str) -> str | None:
    if value is None:
        return None
    m = pattern.match(str(value)) if isinstance(value, str) else None
    letter = m.group(1).lower() if m else None
    if letter not in table:
        first, last = min(table), max(table)
        raise r.fail(where, f"must be a GDPR {article} letter from {first} to {last}, such as "
                     f"{'e' if table is ART6 else 'j'} or {article.split()[1]}({'e' if table is ART6 else 'j'}), got {value!r}.")
    return letter


# --------------------------------------------------------------------------- completeness and currency

def check_site_governance(spec, site, today: dt.date | None = None) -> list[str]:
    """Everything missing, premature or expired in a site's governance record, one sentence each.

    ``site`` is a site name or a ``SiteSpec`` of ``spec``; ``today`` defaults to the local date.
    An empty list means the site may be shipped a plan and take part in rounds today."""
    today = today or dt.date.today()
    name = site if isinstance(site, str) else site.name
    index = spec.site_names.index(name)
    gov: SiteGovernance | None = spec.sites[index].governance
    field = f"sites[{index}].governance"
    if gov is None:
        return [f"{spec.path}: site '{name}' has no governance record (field '{field}'); add its controller, role, "
                "lawful basis, data processing agreement, DPIA and data-use scope before the site takes part (see README, Governance)."]
    problems = [f"{spec.path}: site '{name}' has no {what} on record (field '{field}.{path}'); add it before the site takes part."
                for path, what in ITEMS if gov.value(path) is None]
    for path, what in (("dpa.date", "data processing agreement"), ("dpia.date", "DPIA")):
        d = gov.value(path)
        if d is not None and d > today:
            problems.append(f"{spec.path}: the {what} of site '{name}' is dated {d.isoformat()}, after today "
                            f"({today.isoformat()}) (field '{field}.{path}'); a site takes part only once it is signed and in force.")
    until = gov.value("dpa.valid_until")
    if until is not None and until < today:
        ref = f" {gov.value('dpa.reference')}" if gov.value("dpa.reference") else ""
        problems.append(f"{spec.path}: the data processing agreement{ref} of site '{name}' expired on {until.isoformat()} "
                        f"(field '{field}.dpa.valid_until'); renew it and record the new agreement before the site takes part.")
    return problems


def check_federation_governance(spec, today: dt.date | None = None) -> dict[str, list[str]]:
    """{site: problems} for every site of the federation (empty lists for sites in order)."""
    return {s.name: check_site_governance(spec, s, today) for s in spec.sites}


def require(spec, today: dt.date | None = None) -> None:
    """Raise :class:`GovernanceError` naming every site and missing or out-of-date item, or return quietly."""
    problems = [p for ps in check_federation_governance(spec, today).values() for p in ps]
    if problems:
        raise GovernanceError(problems[0] if len(problems) == 1 else " | ".join(problems))


def describe(spec) -> dict[str, dict]:
    """{site: governance record} for the audit log, the annex and the model card."""
    return {s.name: (s.governance.record() if s.governance else None) for s in spec.sites}


def privacy_of(spec, spent: dict | None = None) -> dict | None:
    """The federation's differential privacy for the audit log, the DPIA annex and the model card; None without DP.

    ``epsilon``/``delta`` are what a finished run spent (``spent``: the flow's privacy summary,
    worst site) when given; before a run, the enforced ``target_epsilon`` (no round that would
    exceed it is run) or None when only σ is set (ε then depends on each site's case count).
    ``epsilon_basis`` says which. The rest are the settings, as the spec names them."""
    p = getattr(spec, "privacy", None)
    if p is None:
        return None
    d = dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(p)
    clip_name = "max_grad_norm" if d.get("mode") == "dp-sgd" else "clip_norm"
    out = {"mode": d.get("mode"), "accountant": d.get("accountant"), clip_name: d.get("clip"),
           "noise_multiplier": d.get("noise_multiplier"), "target_epsilon": d.get("target_epsilon")}
    if d.get("mode") == "client-dp":
        out["noise_at"] = d.get("noise_at")
    if spent:
        out.update(epsilon=float(spent["epsilon"]), delta=float(spent["delta"]), epsilon_basis="spent in this run (worst site)")
        if isinstance(spent.get("noise_multiplier"), dict):
            out["noise_multiplier"] = {k: round(float(v), 4) for k, v in spent["noise_multiplier"].items()}
    else:
        out.update(epsilon=d.get("target_epsilon"), delta=d.get("delta") if d.get("delta") is not None else "1/N per site",
                   epsilon_basis="at most the enforced target" if d.get("target_epsilon") is not None
                   else "computed at each site from σ and its case count when the run starts")
    return out


def privacy_text(p: dict) -> str:
    """One line for the card and the annex: ε, δ, where ε comes from, and the settings."""
    eps = "not known before the run" if p["epsilon"] is None else (
        f"{p['epsilon']:.4g}" if isinstance(p["epsilon"], (int, float)) else str(p["epsilon"]))
    delta = f"{p['delta']:.3g}" if isinstance(p["delta"], (int, float)) else str(p["delta"])
    settings = ", ".join(f"{k} {v}" for k, v in p.items()
                         if k not in ("epsilon", "delta", "epsilon_basis") and v is not None)
    return f"ε = {eps} ({p['epsilon_basis']}), δ = {delta}; settings: {settings}"
