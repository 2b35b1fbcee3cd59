"""The federation spec: one YAML file that says who trains what, where, and how.

Every field is validated before anything starts. A wrong or missing field raises
:class:`SpecError` with one sentence naming the file and the field.
"""
from __future__ import annotations

import datetime as dt
import difflib
import ipaddress
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sitekit import yamlio
from sitekit.governance import SiteGovernance, parse_site_governance

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedadam", "fedyogi", "fedbn")
# Each algorithm's settings and their defaults (see sitekit/algorithms/ for the update rules).
ALGORITHM_SETTINGS: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedprox": {"mu": 0.01},
    "scaffold": {"server_lr": 1.0, "local_lr": 0.01},  # SCAFFOLD's variates assume plain SGD steps
    "fedadam": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
    "fedyogi": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
    "fedbn": {},
}
GATE_RULES = ("every_site", "weighted_mean")
LOCAL_BASELINES = ("cross_site", "own_site")
TASK_KINDS = ("segmentation", "tabular", "classification")
DATASETS = ("heart-disease",)  # tabular datasets with a site reader in sitekit.tabular
LOSSES = ("dice", "dice_ce", "bce")
METRICS = ("dice", "accuracy", "auc")
MODELS = ("unet3d", "logreg", "cnn2d")
NORMS = ("instance", "instance_affine", "batch")
NORMALISATIONS = ("zscore",)
LABELS = ("foreground",)  # brain mask = label > 0
SITE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
FEDERATION_NAME = SITE_NAME
DNS_NAME = re.compile(r"[A-Za-z0-9.-]+")  # the aggregator's host (fullmatch); IP addresses are refused separately


class SpecError(ValueError):
    """A federation spec is wrong; the message names the file and the field."""


@dataclass(frozen=True)
class ModelSpec:
    name: str = "unet3d"
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    res_units: int = 1
    norm: str = "instance"  # instance: no parameters; instance_affine / batch: learnable (FedBN keeps them local)


@dataclass(frozen=True)
class TaskSpec:
    model: ModelSpec
    kind: str = "segmentation"
    dataset: str | None = None  # tabular tasks: which site reader
    loss: str = "dice_ce"
    metric: str = "dice"
    input_size: tuple[int, int, int] = (64, 64, 64)
    normalize: str = "zscore"
    label: str = "foreground"
    # tabular: "site" (each site's own training statistics, FLamby's protocol) or "federated"
    # (one scale from the sites' feature sums; the flow fills feature_stats = (mean, std) before the plan)
    standardise: str = "site"
    feature_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass(frozen=True)
class SiteSpec:
    name: str
    data: Path  # absolute
    governance: SiteGovernance | None = None  # controller, lawful basis, DPA, DPIA (sitekit/governance.py)


@dataclass(frozen=True)
class AggregatorSpec:
    host: str = "localhost"
    port: int = 50051


@dataclass(frozen=True)
class Timeouts:
    startup_seconds: float = 180.0  # until every participant has joined
    round_seconds: float = 900.0  # without any progress inside a round


@dataclass(frozen=True)
class FederationSpec:
    path: Path
    name: str
    task: TaskSpec
    sites: tuple[SiteSpec, ...]
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    algorithm: str = "fedavg"
    aggregator: AggregatorSpec = field(default_factory=AggregatorSpec)
    tls: bool = True
    seed: int = 0
    timeouts: Timeouts = field(default_factory=Timeouts)
    algorithm_params: dict[str, float] = field(default_factory=dict)
    local_steps: int | None = None  # if set, each round is this many optimiser steps instead of local_epochs
    personalise_epochs: int = 0  # local fine-tuning after federation (0: none)
    gate: str = "every_site"
    # cross_site: after the run each site's local-only model is sent to the other sites and scored on
    # their test cases (the "best single site" of FLamby); own_site: it never leaves its site and is
    # scored there only. own_site is the default, and the only choice, under differential privacy:
    # the local-only model is trained without it.
    local_baselines: str = "cross_site"
    simulation: bool = False  # all sites' data on this machine: the pooled baseline can be trained
    privacy: "PrivacySpec | None" = None  # differential privacy (see the privacy section below)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-safe view (used for MLflow params and the plan)."""

        def clean(v):
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, dt.date):
                return v.isoformat()
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))


# --------------------------------------------------------------------------- parsing

_TOP = {
    "name": True, "task": True, "sites": True, "rounds": True, "local_epochs": False,
    "batch_size": True, "learning_rate": True, "algorithm": False, "aggregator": False,
    "tls": False, "seed": False, "timeouts": False, "local_steps": False, "personalise": False, "gate": False,
    "local_baselines": False, "simulation": False, "privacy": False,
}
_TASK = {"model": True, "kind": False, "dataset": False, "loss": False, "metric": False, "input_size": False,
         "preprocessing": False, "standardise": False}
STANDARDISE = ("site", "federated")
_MODEL = {"name": True, "channels": False, "strides": False, "res_units": False, "norm": False}
_PERSONALISE = {"epochs": True}
_PRE = {"normalize": False, "label": False}
_SITE = {"name": True, "data": True, "governance": False}
_AGG = {"host": False, "port": False}
_TIMEOUTS = {"startup_seconds": False, "round_seconds": False}


class _Reader:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> SpecError:
        return SpecError(f"{self.path}: field '{where}' {what}")

    def mapping(self, value: Any, where: str, allowed: dict[str, bool]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where or "(top level)", f"must be a mapping, got {type(value).__name__}.")
        for key in value:
            if key not in allowed:
                full = f"{where}.{key}" if where else str(key)
                close = difflib.get_close_matches(str(key), list(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(allowed)}."
                raise self.fail(full, f"is not a known field{hint}")
        for key, required in allowed.items():
            if required and key not in value:
                full = f"{where}.{key}" if where else key
                raise self.fail(full, "is missing; add it (see federations/ixi-brain.yaml for an example).")
        return value

    def integer(self, value: Any, where: str, minimum: int, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, got {value!r}.")
        if value < minimum or (maximum is not None and value > maximum):
            hi = f" and at most {maximum}" if maximum is not None else ""
            raise self.fail(where, f"must be at least {minimum}{hi}, got {value}.")
        return value

    def number(self, value: Any, where: str, positive: bool = True) -> float:
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)"
            except ValueError:
                hint = ""
            raise self.fail(where, f"must be a number, got {value!r}{hint}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"must be a number, got {value!r}.")
        if value != value or value in (float("inf"), float("-inf")) or abs(value) > 1e9:
            raise self.fail(where, f"must be a finite number of sensible size, got {value!r}.")
        if positive and not value > 0:
            raise self.fail(where, f"must be greater than 0, got {value}.")
        return float(value)

    def choice(self, value: Any, where: str, options: tuple[str, ...]) -> str:
        if value not in options:
            raise self.fail(where, f"must be one of {', '.join(options)}, got {value!r}.")
        return value

    def int_list(self, value: Any, where: str, length: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"must be a non-empty list of integers, got {value!r}.")
        if length is not None and len(value) != length:
            raise self.fail(where, f"must have {length} entries, got {len(value)}.")
        return tuple(self.integer(v, f"{where}[{i}]", 1) for i, v in enumerate(value))


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def load_spec(path: str | Path) -> FederationSpec:
    """Read and validate a federation spec; raise SpecError naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: the federation spec does not exist; pass the path of a YAML file.") from None
    except OSError as exc:
        raise SpecError(f"{path}: the federation spec cannot be read ({exc.strerror}).") from None
    except UnicodeDecodeError:
        # never echo the bytes: a wrong path can point at patient data
        raise SpecError(f"{path}: the federation spec is not UTF-8 text; save it as UTF-8 YAML (is this the right file?).") from None
    try:
        raw = yamlio.load(text)
    except yaml.YAMLError as exc:
        where, what = yamlio.problem(exc)
        raise SpecError(f"{path}: not valid YAML{where}: {what}.") from None
    if raw is None:
        raise SpecError(f"{path}: the federation spec is empty; see federations/ixi-brain.yaml for an example.")
    return parse_spec(raw, path)


def parse_spec(raw: Any, path: Path) -> FederationSpec:
    r = _Reader(path)
    top = r.mapping(raw, "", _TOP)
    base = path.resolve().parent

    name = top["name"]
    if not isinstance(name, str) or not FEDERATION_NAME.fullmatch(name):
        raise r.fail("name", f"must be 2-40 lowercase letters, digits or '-', starting with a letter, got {name!r}.")

    task_raw = r.mapping(top["task"], "task", _TASK)
    kind = r.choice(task_raw.get("kind", "segmentation"), "task.kind", TASK_KINDS)
    if kind == "tabular":
        task = _tabular_task(r, task_raw)
    elif kind == "classification":
        task = _classification_task(r, task_raw)
    else:
        task = _segmentation_task(r, task_raw)
    return _rest(r, top, path, task)


def _tabular_task(r: "_Reader", task_raw: dict) -> TaskSpec:
    model_raw = r.mapping(task_raw["model"], "task.model", {"name": True})
    if model_raw["name"] != "logreg":
        raise r.fail("task.model.name", f"must be logreg for a tabular task, got {model_raw['name']!r}.")
    for key in ("input_size", "preprocessing"):
        if key in task_raw:
            raise r.fail(f"task.{key}", "applies to segmentation tasks only; remove it from this tabular task.")
    return TaskSpec(
        model=ModelSpec(name="logreg", channels=(), strides=(), res_units=0, norm="instance"),
        kind="tabular", dataset=r.choice(task_raw.get("dataset"), "task.dataset", DATASETS),
        loss=r.choice(task_raw.get("loss", "bce"), "task.loss", ("bce",)),
        metric=r.choice(task_raw.get("metric", "accuracy"), "task.metric", ("accuracy",)),
        input_size=(1, 1, 1), normalize="zscore", label="foreground",
        standardise=r.choice(task_raw.get("standardise", "site"), "task.standardise", STANDARDISE),
    )


def _classification_task(r: "_Reader", task_raw: dict) -> TaskSpec:
    """2D greyscale image classification (e.g. PneumoniaMNIST chest X-rays), binary, scored by AUC."""
    for key in ("dataset", "preprocessing", "standardise"):
        if key in task_raw:
            raise r.fail(f"task.{key}", "does not apply to classification tasks; a classification site's data folder "
                         "holds its train.npz and test.npz.")
    model_raw = r.mapping(task_raw["model"], "task.model", {"name": True, "channels": False})
    if model_raw["name"] != "cnn2d":
        raise r.fail("task.model.name", f"must be cnn2d for a classification task, got {model_raw['name']!r}.")
    channels = r.int_list(model_raw.get("channels", [16, 32, 32]), "task.model.channels", 3)
    if max(channels) > 256:
        raise r.fail("task.model.channels", f"must be at most 256 per layer, got {list(channels)}.")
    input_size = r.int_list(task_raw.get("input_size", [28, 28]), "task.input_size", 2)
    for i, n in enumerate(input_size):
        if n < 8 or n > 512 or n % 4:
            raise r.fail(f"task.input_size[{i}]", f"must be a multiple of 4 between 8 and 512 (the network halves "
                         f"the image twice), got {n}.")
    return TaskSpec(
        # group norm: per-example statistics, so DP-SGD's per-example gradients exist (batch norm has none)
        model=ModelSpec(name="cnn2d", channels=channels, strides=(2, 2), res_units=0, norm="group"),
        kind="classification", loss=r.choice(task_raw.get("loss", "bce"), "task.loss", ("bce",)),
        metric=r.choice(task_raw.get("metric", "auc"), "task.metric", ("auc",)),
        input_size=input_size,  # type: ignore[arg-type]
    )


def _segmentation_task(r: "_Reader", task_raw: dict) -> TaskSpec:
    if "dataset" in task_raw:
        raise r.fail("task.dataset", "applies to tabular tasks only; a segmentation site's data folder is its dataset.")
    if "standardise" in task_raw:
        raise r.fail("task.standardise", "applies to tabular tasks only; images are normalised by task.preprocessing.normalize.")
    model_raw = r.mapping(task_raw["model"], "task.model", _MODEL)
    model = ModelSpec(
        name=r.choice(model_raw["name"], "task.model.name", ("unet3d",)),
        channels=r.int_list(model_raw.get("channels", [8, 16, 32, 64]), "task.model.channels"),
        strides=r.int_list(model_raw.get("strides", [2, 2, 2]), "task.model.strides"),
        res_units=r.integer(model_raw.get("res_units", 1), "task.model.res_units", 0, 4),
        norm=r.choice(model_raw.get("norm", "instance"), "task.model.norm", NORMS),
    )
    if max(model.channels) > 512:  # a 3D UNet wider than this cannot train on a site's CPU or GPU
        raise r.fail("task.model.channels", f"must be at most 512 per level, got {list(model.channels)}.")
    if len(model.strides) != len(model.channels) - 1:
        raise r.fail("task.model.strides", f"must have one entry fewer than task.model.channels ({len(model.channels) - 1}), got {len(model.strides)}.")
    pre = r.mapping(task_raw.get("preprocessing", {}) or {}, "task.preprocessing", _PRE)
    input_size = r.int_list(task_raw.get("input_size", [64, 64, 64]), "task.input_size", 3)
    factor = 1
    for s in model.strides:
        factor *= s
    for i, n in enumerate(input_size):
        if n < 2 * factor or n > 512:
            raise r.fail(f"task.input_size[{i}]", f"must be between {2 * factor} (twice the product of task.model.strides) and 512, got {n}.")
        if n % factor:
            raise r.fail(f"task.input_size[{i}]", f"must be divisible by {factor} (the product of task.model.strides), got {n}.")
    return TaskSpec(
        model=model,
        loss=r.choice(task_raw.get("loss", "dice_ce"), "task.loss", ("dice", "dice_ce")),
        metric=r.choice(task_raw.get("metric", "dice"), "task.metric", ("dice",)),
        input_size=input_size,  # type: ignore[arg-type]
        normalize=r.choice(pre.get("normalize", "zscore"), "task.preprocessing.normalize", NORMALISATIONS),
        label=r.choice(pre.get("label", "foreground"), "task.preprocessing.label", LABELS),
    )


def _algorithm(r: "_Reader", raw: Any) -> tuple[str, dict[str, float]]:
    """``algorithm: fedprox`` or ``algorithm: {name: fedprox, mu: 0.1}``; settings default per algorithm."""
    if isinstance(raw, dict):
        name = r.choice(raw.get("name"), "algorithm.name", ALGORITHMS)
        allowed = {"name": True, **{k: False for k in ALGORITHM_SETTINGS[name]}}
        r.mapping(raw, "algorithm", allowed)
        given = {k: v for k, v in raw.items() if k != "name"}
    else:
        name = r.choice(raw, "algorithm", ALGORITHMS)
        given = {}
    params = {}
    for key, default in ALGORITHM_SETTINGS[name].items():
        value = r.number(given.get(key, default), f"algorithm.{key}", positive=(key != "mu"))
        if key == "mu" and value < 0:
            raise r.fail("algorithm.mu", f"must be at least 0 (0 is FedAvg), got {value}.")
        if key in ("beta1", "beta2") and not value < 1:
            raise r.fail(f"algorithm.{key}", f"must be below 1, got {value}.")
        params[key] = value
    return name, params


def _rest(r: "_Reader", top: dict, path: Path, task: TaskSpec) -> FederationSpec:
    base = path.resolve().parent
    name = top["name"]

    sites_raw = top["sites"]
    if not isinstance(sites_raw, list) or not sites_raw:
        raise r.fail("sites", "must be a non-empty list of {name, data} entries.")
    sites: list[SiteSpec] = []
    seen_names: dict[str, int] = {}
    for i, s in enumerate(sites_raw):
        s = r.mapping(s, f"sites[{i}]", _SITE)
        sname = s["name"]
        if not isinstance(sname, str) or not SITE_NAME.fullmatch(sname):
            raise r.fail(f"sites[{i}].name", f"must be 2-40 lowercase letters, digits or '-', starting with a letter, got {sname!r}.")
        if sname in seen_names:
            raise r.fail(f"sites[{i}].name", f"repeats site '{sname}' (also sites[{seen_names[sname]}]); every site needs its own name.")
        seen_names[sname] = i
        if not isinstance(s["data"], str) or not s["data"].strip():
            raise r.fail(f"sites[{i}].data", f"must be the path of site '{sname}''s data, got {s['data']!r}.")
        raw_data = os.path.expandvars(s["data"])
        if "$" in raw_data:
            raise r.fail(f"sites[{i}].data", f"uses an environment variable that is not set ({s['data']}); "
                         "set it (e.g. FEDWARD_DATA=../shared/data) or write the path out.")
        data = Path(raw_data).expanduser()
        data = (base / data).resolve() if not data.is_absolute() else data.resolve()
        sites.append(SiteSpec(name=sname, data=data, governance=parse_site_governance(r, s.get("governance"), f"sites[{i}]")))
    for i, a in enumerate(sites):
        for j, b in enumerate(sites[:i]):
            if a.data == b.data or a.data in b.data.parents or b.data in a.data.parents:
                raise r.fail(f"sites[{i}].data", f"of site '{a.name}' ({a.data}) overlaps the data folder of site '{b.name}' ({b.data}); each site must read only its own folder.")

    agg_raw = r.mapping(top.get("aggregator", {}) or {}, "aggregator", _AGG)
    host = agg_raw.get("host", "localhost")
    if not isinstance(host, str) or not DNS_NAME.fullmatch(host):
        raise r.fail("aggregator.host", f"must be a DNS name (the aggregator certificate carries it), got {host!r}.")
    if _is_ip_address(host):
        raise r.fail("aggregator.host", f"must be a DNS name, not an IP address ({host}): the aggregator's certificate "
                     "carries a DNS name that sites verify; use e.g. localhost or aggregator.hospital.org.")
    agg = AggregatorSpec(host=host, port=r.integer(agg_raw.get("port", 50051), "aggregator.port", 1024, 65535))

    tls = top.get("tls", True)
    if not isinstance(tls, bool):
        raise r.fail("tls", f"must be true or false, got {tls!r}.")

    t_raw = r.mapping(top.get("timeouts", {}) or {}, "timeouts", _TIMEOUTS)
    timeouts = Timeouts(
        startup_seconds=r.number(t_raw.get("startup_seconds", Timeouts.startup_seconds), "timeouts.startup_seconds"),
        round_seconds=r.number(t_raw.get("round_seconds", Timeouts.round_seconds), "timeouts.round_seconds"),
    )

    algorithm, algorithm_params = _algorithm(r, top.get("algorithm", "fedavg"))
    if algorithm == "fedbn" and (task.kind != "segmentation" or task.model.norm == "instance"):
        raise r.fail("algorithm", "is fedbn, which keeps normalisation layers local, but this model has no learnable "
                     "normalisation layers; set task.model.norm to instance_affine or batch, or choose another algorithm.")
    local_steps = top.get("local_steps")
    if local_steps is not None:
        local_steps = r.integer(local_steps, "local_steps", 1, 100000)
    if "local_epochs" not in top and local_steps is None:
        raise r.fail("local_epochs", "is missing; add local_epochs (or local_steps) to say how much each site trains per round.")
    personalise = 0
    if top.get("personalise") is not None:
        p = r.mapping(top["personalise"], "personalise", _PERSONALISE)
        personalise = r.integer(p["epochs"], "personalise.epochs", 0, 1000)
    simulation = top.get("simulation", False)
    if not isinstance(simulation, bool):
        raise r.fail("simulation", f"must be true or false, got {simulation!r}.")
    if "privacy" in top and top["privacy"] is None:  # e.g. every line under it commented out: never silently no DP
        raise r.fail("privacy", "is empty; give privacy.mode (dp-sgd or client-dp) and its settings, or remove the "
                     "privacy key to train without differential privacy.")
    privacy = _privacy(r, top["privacy"], task, algorithm) if top.get("privacy") is not None else None
    local_baselines = r.choice(top.get("local_baselines") or ("own_site" if privacy else "cross_site"), "local_baselines",
                               LOCAL_BASELINES)  # left empty: the default
    if privacy and local_baselines == "cross_site":
        raise r.fail("local_baselines", "is cross_site, which would send each site's local-only model, trained without "
                     "differential privacy, to the other sites and void the privacy guarantee; use own_site (the default "
                     "when privacy is on) or leave it out.")

    return FederationSpec(
        path=path.resolve(),
        name=name,
        task=task,
        sites=tuple(sites),
        rounds=r.integer(top["rounds"], "rounds", 1, 1000),
        local_epochs=r.integer(top.get("local_epochs", 1), "local_epochs", 1, 1000),
        batch_size=r.integer(top["batch_size"], "batch_size", 1, 1024),
        learning_rate=r.number(top["learning_rate"], "learning_rate"),
        algorithm=algorithm,
        algorithm_params=algorithm_params,
        local_steps=local_steps,
        personalise_epochs=personalise,
        gate=r.choice(top.get("gate", "every_site"), "gate", GATE_RULES),
        local_baselines=local_baselines,
        simulation=simulation,
        privacy=privacy,
        aggregator=agg,
        tls=tls,
        seed=r.integer(top.get("seed", 0), "seed", 0, 2**31 - 1),
        timeouts=timeouts,
    )


# --------------------------------------------------------------------------- privacy

PRIVACY_MODES = ("dp-sgd", "client-dp")
NOISE_AT = ("server", "site")
ACCOUNTANTS = ("rdp", "prv")
_PRIVACY = {"mode": True, "noise_multiplier": False, "max_grad_norm": False, "clip_norm": False, "noise_at": False,
            "target_epsilon": False, "delta": False, "accountant": False}


@dataclass(frozen=True)
class PrivacySpec:
    """Differential privacy for a federation; the mechanisms live in :mod:`sitekit.privacy`.

    - ``dp-sgd``: every site trains with DP-SGD (each example's gradient clipped to ``clip``,
      Gaussian noise ``noise_multiplier * clip`` per step, Poisson sampling); ε per site.
    - ``client-dp``: DP-FedAvg; each site's update is clipped to ``clip`` and Gaussian noise
      ``noise_multiplier * clip`` is added to the sum of updates, at the server or at each site.

    ``noise_multiplier`` None: derived at each site from ``target_epsilon`` for the whole run.
    ``delta`` None: 1/N at each site, N its number of training cases (dp-sgd only).
    """

    mode: str
    clip: float  # dp-sgd: max_grad_norm (per example); client-dp: clip_norm (per site update)
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    noise_at: str = "site"
    accountant: str = "rdp"


def _privacy(r: "_Reader", raw: Any, task: TaskSpec, algorithm: str) -> PrivacySpec:
    p = r.mapping(raw, "privacy", _PRIVACY)
    mode = r.choice(p["mode"], "privacy.mode", PRIVACY_MODES)
    if mode == "dp-sgd":
        if "clip_norm" in p:
            raise r.fail("privacy.clip_norm", "applies to client-dp only; dp-sgd clips each example's gradient to "
                         "privacy.max_grad_norm.")
        if p.get("noise_at", "site") != "site":
            raise r.fail("privacy.noise_at", "must be site (or left out) for dp-sgd, which adds its noise at each site "
                         f"in every optimiser step, got {p['noise_at']!r}.")
        clip = r.number(p.get("max_grad_norm", 1.0), "privacy.max_grad_norm")
        noise_at = "site"
        if task.kind == "segmentation" and task.model.norm == "batch":
            raise r.fail("task.model.norm", "is batch, which dp-sgd cannot train (batch statistics mix examples, so "
                         "per-example gradients do not exist); use instance or instance_affine.")
    else:
        if "max_grad_norm" in p:
            raise r.fail("privacy.max_grad_norm", "applies to dp-sgd only; client-dp clips each site's update to "
                         "privacy.clip_norm.")
        if "clip_norm" not in p:
            raise r.fail("privacy.clip_norm", "is missing; client-dp needs the largest update norm a site may send "
                         "(e.g. 0.5).")
        clip = r.number(p["clip_norm"], "privacy.clip_norm")
        noise_at = r.choice(p.get("noise_at", "server"), "privacy.noise_at", NOISE_AT)
        if "delta" not in p:
            raise r.fail("privacy.delta", "is missing; client-dp protects whole sites, so 1/(number of sites) would "
                         "protect nothing: give a small delta such as 1.0e-5.")
        if algorithm == "scaffold":
            raise r.fail("algorithm", "is scaffold, whose control variate would leave each site without client-dp's "
                         "clipping and noise; choose fedavg, fedprox, fedadam, fedyogi or fedbn.")
    noise = target = delta = None
    if p.get("noise_multiplier") is not None:
        noise = r.number(p["noise_multiplier"], "privacy.noise_multiplier", positive=False)
        if not 0 < noise <= 100:
            raise r.fail("privacy.noise_multiplier", f"must be greater than 0 and at most 100, got {noise} "
                         "(to train without privacy, remove the privacy section).")
    if p.get("target_epsilon") is not None:
        target = r.number(p["target_epsilon"], "privacy.target_epsilon")
        if target > 1000:
            raise r.fail("privacy.target_epsilon", f"must be at most 1000, got {target}.")
    if noise is None and target is None:
        raise r.fail("privacy.noise_multiplier", "is missing; give privacy.noise_multiplier, or privacy.target_epsilon "
                     "for fedward to derive it.")
    if p.get("delta") is not None:
        delta = r.number(p["delta"], "privacy.delta")
        if not delta < 1:
            raise r.fail("privacy.delta", f"must be between 0 and 1 (e.g. 1.0e-5), got {delta}.")
    return PrivacySpec(mode=mode, clip=clip, noise_multiplier=noise, target_epsilon=target, delta=delta,
                       noise_at=noise_at, accountant=r.choice(p.get("accountant", "rdp"), "privacy.accountant", ACCOUNTANTS))
