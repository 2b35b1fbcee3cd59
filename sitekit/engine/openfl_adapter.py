"""The one place fedward talks to OpenFL (1.9).

Upstream OpenFL is no longer developed, so every OpenFL import, class and file convention
lives in this module; the rest of fedward speaks of federations, sites, rounds and plans.
A second engine would be a sibling module offering the same functions:

- :func:`plan_config` / :func:`write_plan`: the OpenFL plan for a federation spec (byte-identical
  at every participant; per-site settings go in ``plan/data.yaml``).
- :func:`participant_layout`: where OpenFL expects certificates and keys in a participant folder.
- :func:`initialize_model`: the initial model file (what ``fx plan initialize`` does).
- :func:`run_aggregator` / :func:`run_collaborator`: process entry points
  (``python -m sitekit.engine.openfl_adapter aggregator|collaborator``).
- :func:`read_global_model`: the last aggregated model as a PyTorch state dict.

OpenFL 1.9 behaviours handled here (see ENVIRONMENT.md):
- an idle collaborator is told to sleep 10 s: :class:`FedwardAggregator` instead holds the
  GetTasks call open (bounded) until the round advances, so no round waits on a poll;
- the aggregator's own serve loop checks for completion every 5 s and listens on all
  interfaces: we run our own loop and bind only the address we are given;
- collaborators retry failed RPCs forever: before joining, a site makes one bounded,
  authenticated Ping and exits with a reason if the aggregator refuses it;
- callbacks are not read from the plan and an exception inside one hangs the federation:
  ours are injected in Python and never raise;
- differential privacy (:mod:`sitekit.privacy`): DP-SGD runs inside the task runner's train
  step; client-level DP clips at the site and adds noise in :class:`FedwardAggregation` (or at
  the site); a federation whose next round would exceed ``target_epsilon`` is ended by the
  aggregator after the last round within budget (OpenFL has no such notion: we lower
  ``rounds_to_train`` in the round-end callback, so OpenFL finishes the experiment cleanly).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from sitekit.algorithms import fedbn, scaffold
from sitekit.algorithms.fedadam import FedAdam
from sitekit.algorithms.fedyogi import FedYogi
from sitekit.algorithms.fedprox import ProximalTerm
from sitekit.audit import AuditLog, tensors_digest
from sitekit.data import DataError
from sitekit.layout import participant_layout  # noqa: F401  (re-exported: the OpenFL folder convention)
from sitekit.netcheck import tls_probe
from sitekit.privacy import PrivacyAccountant, federation_budget, site_budget
from sitekit.privacy import client_dp
from sitekit.spec import FederationSpec, ModelSpec, TaskSpec
from sitekit.tasks import get_task
from sitekit.training import make_loader, make_optimizer, train_round

# OpenFL imports are deliberately confined to this module.
from openfl.callbacks import Callback
from openfl.component.aggregator.aggregator import Aggregator
from openfl.federated.data.loader import DataLoader
from openfl.federated.plan import Plan
from openfl.federated.task.runner_pt import PyTorchTaskRunner
from openfl.interface.aggregation_functions import AggregationFunction
from openfl.pipelines import NoCompressionPipeline
from openfl.protocols import aggregator_pb2, aggregator_pb2_grpc, utils as proto_utils
from openfl.transport.grpc.common import create_grpc_server, create_header, create_tls_channel
from openfl.utilities import Metric, TensorKey

log = logging.getLogger("fedward.engine")

ENGINE = "openfl-1.9"
PLAN = Path("plan/plan.yaml")
COLS = Path("plan/cols.yaml")
DATA = Path("plan/data.yaml")
INIT_MODEL = Path("save/init.pbuf")
LAST_MODEL = Path("save/last.pbuf")  # OpenFL's: the model *entering* the last round
FINAL_MODEL = Path("save/final.pbuf")  # ours: the aggregate of the last round's updates
EVENTS = Path("events.jsonl")
AUDIT = Path("audit.jsonl")  # the federation's audit log, in the aggregator's folder (sitekit/audit.py)
STATUS = Path("status.json")
MODEL_PREFIX = "model."  # the task runner holds the network as ``self.model``
SCAFFOLD_PREFIX = "scaffold_c."  # SCAFFOLD: the server control variate travels beside the model
SITE_STATE = Path("site_state")  # what a site keeps between rounds and across restarts (never sent)
SERVER_STATE = Path("local_state/server")  # the aggregator's optimiser state, one file per round
PRIVACY_STATE = SITE_STATE / "privacy.json"  # a site's privacy accountant (dp-sgd; client-dp with noise at the site)
PRIVACY_STOP = Path("local_state/privacy_stop.json")  # the aggregator's budget stop, kept across a restart
PRIVACY_METRICS = ("epsilon", "epsilon_next", "delta", "noise_multiplier", "sample_rate", "privacy_steps")

# Exit codes a participant uses so the supervisor can say what happened.
EXIT_DATA = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5
EXIT_CRASH = 6
EXIT_PRIVACY = 7  # a site refused a round that would exceed its privacy budget


class PrivacyBudgetExceeded(RuntimeError):
    """A site was asked to train a round that would take it past ``target_epsilon``."""


def privacy_to_dict(privacy) -> dict | None:
    """The spec's privacy section as plain data for the plan (None: no DP)."""
    if privacy is None:
        return None
    from dataclasses import asdict

    return asdict(privacy)


# --------------------------------------------------------------------------- plan & layout

def task_to_dict(task: TaskSpec) -> dict:
    return {
        "kind": task.kind, "dataset": task.dataset,
        "model": {"name": task.model.name, "channels": list(task.model.channels),
                  "strides": list(task.model.strides), "res_units": task.model.res_units, "norm": task.model.norm},
        "loss": task.loss, "metric": task.metric, "input_size": list(task.input_size),
        "normalize": task.normalize, "label": task.label, "standardise": task.standardise,
        "feature_stats": [list(task.feature_stats[0]), list(task.feature_stats[1])] if task.feature_stats else None,
    }


def task_from_dict(d: dict) -> TaskSpec:
    m = d["model"]
    return TaskSpec(
        model=ModelSpec(m["name"], tuple(m["channels"]), tuple(m["strides"]), m["res_units"], m.get("norm", "instance")),
        kind=d.get("kind", "segmentation"), dataset=d.get("dataset"),
        loss=d["loss"], metric=d["metric"], input_size=tuple(d["input_size"]),
        normalize=d["normalize"], label=d["label"], standardise=d.get("standardise", "site"),
        feature_stats=(tuple(d["feature_stats"][0]), tuple(d["feature_stats"][1])) if d.get("feature_stats") else None,
    )


def plan_config(spec: FederationSpec) -> dict:
    """The OpenFL plan for a federation. Nothing site-specific may appear here."""
    tls = bool(spec.tls)
    plan = {
        "aggregator": {
            "template": "sitekit.engine.openfl_adapter.FedwardAggregator",
            "settings": {
                "init_state_path": str(INIT_MODEL), "best_state_path": "save/best.pbuf",
                "last_state_path": str(LAST_MODEL), "rounds_to_train": spec.rounds,
                "db_store_rounds": 2, "persist_checkpoint": True,
                "persistent_db_path": "local_state/tensor.db", "use_delta_updates": False,
                "events_path": str(EVENTS), "audit_path": str(AUDIT),
                # the last day each site's data processing agreement applies: no round starts after it
                "agreements_valid_until": {s.name: s.governance.dpa.valid_until.isoformat() for s in spec.sites
                                           if s.governance and s.governance.dpa and s.governance.dpa.valid_until},
            },
        },
        "collaborator": {
            "template": "openfl.component.Collaborator",
            "settings": {"opt_treatment": "RESET", "use_delta_updates": False, "db_store_rounds": 1},
        },
        "data_loader": {
            "template": "sitekit.engine.openfl_adapter.SiteDataLoader",
            "settings": {"batch_size": spec.batch_size, "task": task_to_dict(spec.task), "seed": spec.seed},
        },
        "task_runner": {
            "template": "sitekit.engine.openfl_adapter.FedwardTaskRunner",
            "settings": {"task": task_to_dict(spec.task), "learning_rate": spec.learning_rate, "seed": spec.seed,
                         "algorithm": spec.algorithm, "algorithm_params": dict(spec.algorithm_params),
                         "local_steps": spec.local_steps},
        },
        "network": {
            "template": "openfl.federation.Network",
            "settings": {
                "agg_addr": spec.aggregator.host, "agg_port": spec.aggregator.port, "use_tls": tls,
                "require_client_auth": tls, "client_reconnect_interval": 1, "cert_folder": "cert",
                "enable_atomic_connections": False, "transport_protocol": "grpc",
            },
        },
        "assigner": {
            "template": "openfl.component.RandomGroupedAssigner",
            "settings": {"task_groups": [{"name": "learning", "percentage": 1.0, "tasks": [
                "aggregated_model_validation", "train", "locally_tuned_model_validation"]}]},
        },
        "tasks": {
            "aggregated_model_validation": {"function": "validate_task", "kwargs": {"apply": "global", "metrics": [spec.task.metric]}},
            "locally_tuned_model_validation": {"function": "validate_task", "kwargs": {"apply": "local", "metrics": [spec.task.metric]}},
            "train": {"function": "train_task", "kwargs": {"metrics": ["loss"], "epochs": spec.local_epochs},
                      "aggregation_type": {
                          "template": "sitekit.engine.openfl_adapter.FedwardAggregation",
                          "settings": {"algorithm": spec.algorithm, "params": dict(spec.algorithm_params),
                                       "n_sites": len(spec.sites)}}},
        },
        "compression_pipeline": {"template": "openfl.pipelines.NoCompressionPipeline", "settings": {}},
    }
    if spec.privacy is not None:
        privacy = privacy_to_dict(spec.privacy)
        plan["aggregator"]["settings"]["privacy"] = privacy
        plan["task_runner"]["settings"].update(privacy=privacy, rounds=spec.rounds)
        plan["tasks"]["train"]["aggregation_type"]["settings"].update(privacy=privacy, rounds=spec.rounds)
    return plan


def plan_text(spec: FederationSpec) -> str:
    return yaml.safe_dump(plan_config(spec), sort_keys=True, default_flow_style=False)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_plan(spec: FederationSpec, folder: Path, site: str | None = None) -> Path:
    """Write the plan, the authorised-site list and (for a site) its data setting into ``folder``."""
    _atomic_write(folder / PLAN, plan_text(spec))
    _atomic_write(folder / COLS, yaml.safe_dump({"collaborators": spec.site_names}))
    if site is not None:
        _atomic_write(folder / DATA, f"{site},{spec.site(site).data}\n")
    return folder / PLAN


def model_tensors(spec: FederationSpec) -> dict[str, np.ndarray]:
    """The initial (seeded) shared model as named arrays: what travels between sites and aggregator."""
    runner = FedwardTaskRunner(task=task_to_dict(spec.task), learning_rate=spec.learning_rate, seed=spec.seed,
                               algorithm=spec.algorithm, algorithm_params=dict(spec.algorithm_params),
                               data_loader=SiteDataLoader(data_path=None, task=task_to_dict(spec.task)))
    # Tensors that stay at the sites (FedBN's normalisation layers) are not part of the shared model.
    return {k: v for k, v in runner.get_tensor_dict(with_opt_vars=False).items() if k not in runner.site_local_names}


def initialize_model(spec: FederationSpec, folder: Path) -> Path:
    """Write the initial (seeded) model the aggregator starts from, as ``fx plan initialize`` would."""
    tensors = model_tensors(spec)
    proto = proto_utils.construct_model_proto(tensors, 0, NoCompressionPipeline())
    (folder / INIT_MODEL).parent.mkdir(parents=True, exist_ok=True)
    proto_utils.dump_proto(proto, str(folder / INIT_MODEL))
    return folder / INIT_MODEL


def read_global_model(aggregator_folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The final aggregated model as a state dict for the task's model, and its round.

    Only shared tensors: under FedBN the normalisation layers are each site's own (see
    :func:`site_local_tensors`); SCAFFOLD's control variate is not part of the model."""
    proto = proto_utils.load_proto(str(aggregator_folder / FINAL_MODEL))
    tensors, round_number = proto_utils.deconstruct_model_proto(proto, NoCompressionPipeline())
    state = {k[len(MODEL_PREFIX):]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    return state, int(round_number)


def site_settings(folder: Path) -> dict:
    """What a site needs from its workspace outside a round: task, optimiser settings, its data folder."""
    plan = yaml.safe_load((folder / PLAN).read_text())
    runner = plan["task_runner"]["settings"]
    loader = plan["data_loader"]["settings"]
    name, data = (folder / DATA).read_text().strip().split(",", 1)
    return {
        "site": name, "data": Path(data), "task": task_from_dict(runner["task"]),
        "learning_rate": float(runner["learning_rate"]), "seed": int(runner["seed"]),
        "batch_size": int(loader["batch_size"]),
        "epochs_per_round": int(plan["tasks"]["train"]["kwargs"]["epochs"]),
        "steps_per_round": runner.get("local_steps"),
        "rounds": int(plan["aggregator"]["settings"]["rounds_to_train"]),
        "algorithm": runner.get("algorithm", "fedavg"), "algorithm_params": runner.get("algorithm_params", {}),
        "privacy": runner.get("privacy"),
    }


def site_local_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A site's own tensors that never leave it (FedBN's normalisation layers), as model state-dict entries."""
    path = folder / SITE_STATE / "fedbn.pt"
    if not path.exists():
        return {}
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return {k[len(MODEL_PREFIX):]: v for k, v in saved["tensors"].items()}


def plan_hash(folder: Path) -> str:
    """OpenFL's hash of a participant's plan (the federation id is derived from it)."""
    plan = Plan.parse(folder / PLAN, folder / COLS, resolve=False)
    return plan.hash


# --------------------------------------------------------------------------- site side

class SiteDataLoader(DataLoader):
    """Serves one site's preprocessed volumes to OpenFL; reads only the folder in data.yaml."""

    def __init__(self, data_path=None, batch_size=2, task=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.seed = seed
        self._epochs = 0
        self.train_set = self.test_set = None
        if data_path is None:  # building the model only
            return
        site = os.environ.get("FEDWARD_SITE", Path(data_path).name)
        t = get_task(task_from_dict(task))
        self.train_set = t.dataset(site, Path(data_path), "train")
        self.test_set = t.dataset(site, Path(data_path), "test")

    def get_feature_shape(self):
        return [1]

    def get_train_loader(self, **kwargs):
        self._epochs += 1
        return make_loader(self.train_set, self.batch_size, shuffle=True, seed=self.seed * 100003 + self._epochs)

    def get_valid_loader(self, **kwargs):
        return make_loader(self.test_set, self.batch_size, shuffle=False)

    def get_train_data_size(self):
        return len(self.train_set)

    def get_valid_data_size(self):
        return len(self.test_set)


class FedwardTaskRunner(PyTorchTaskRunner):
    """OpenFL's view of a site's training: delegates to :mod:`sitekit.training` and the algorithms.

    - fedprox: the proximal term anchored at the round's global model;
    - scaffold: local SGD steps corrected by (c - c_i); the site's own variate c_i lives in
      ``site_state/scaffold.pt`` (survives a restart) and only Δc_i is sent, as ``scaffold_c.*``;
    - fedbn: normalisation tensors are held out (never sent) and kept in ``site_state/fedbn.pt``.
    """

    def __init__(self, task: dict, learning_rate: float, seed: int = 0, algorithm: str = "fedavg",
                 algorithm_params: dict | None = None, local_steps: int | None = None,
                 privacy: dict | None = None, rounds: int | None = None, **kwargs):
        super().__init__(device="cpu", **kwargs)
        self.privacy = dict(privacy) if privacy else None
        self.rounds = rounds
        self._privacy_report: dict[str, float] = {}
        self.task = get_task(task_from_dict(task))
        self.model = self.task.build_model(seed=seed)
        self.loss_fn = self.task.loss()
        self.algorithm = algorithm
        self.params = dict(algorithm_params or {})
        self.local_steps = local_steps
        self.learning_rate = learning_rate
        self.optimizer_kind = "sgd" if algorithm == "scaffold" else "adam"
        self.optimizer = self._new_optimizer()
        self._train_seconds = 0.0
        self._round = 0
        self._epochs = 1
        self.site_local_names: set[str] = set()
        if algorithm == "scaffold":
            import copy

            self.scaffold_c = copy.deepcopy(self.model)  # same shapes as the model: the server variate c
            for p in self.scaffold_c.parameters():
                p.requires_grad_(False)
                p.zero_()
        if algorithm == "fedbn":
            self.site_local_names = {MODEL_PREFIX + n for n in fedbn.local_tensor_names(self.model)}
            self.tensor_dict_split_fn_kwargs["holdout_tensor_names"] = [
                *self.tensor_dict_split_fn_kwargs.get("holdout_tensor_names", []), *sorted(self.site_local_names)]

    def _new_optimizer(self):
        lr = self.params.get("local_lr", self.learning_rate) if self.optimizer_kind == "sgd" else self.learning_rate
        return make_optimizer(self.model, lr, self.optimizer_kind)

    def forward(self, x):
        return self.model(x)

    def reset_opt_vars(self):
        self.optimizer = self._new_optimizer()

    # -- tensors: what is shared, what stays ---------------------------------------------------

    def initialize_tensorkeys_for_functions(self, with_opt_vars=False):
        super().initialize_tensorkeys_for_functions(with_opt_vars)
        if self.site_local_names:  # the site fills these itself (set_tensor_dict); never ask for them
            req = self.required_tensorkeys_for_function
            req["train_task"] = [k for k in req["train_task"] if k[0] not in self.site_local_names]
            req["validate_task"]["apply=global"] = [k for k in req["validate_task"]["apply=global"]
                                                    if k[0] not in self.site_local_names]

    def set_tensor_dict(self, tensor_dict, with_opt_vars=False):
        own = self._load_site_local()
        state = self.state_dict()
        new = {}
        for k, current in state.items():
            if k in self.site_local_names and k in own:
                new[k] = own[k]
            elif k in tensor_dict:
                new[k] = torch.as_tensor(np.array(tensor_dict[k])).to(current.dtype)
            else:
                new[k] = current
        self.load_state_dict(new)

    def _load_site_local(self) -> dict[str, torch.Tensor]:
        path = SITE_STATE / "fedbn.pt"
        if not self.site_local_names or not path.exists():
            return {}
        return torch.load(path, map_location="cpu", weights_only=True)["tensors"]

    def _save(self, name: str, obj) -> None:
        SITE_STATE.mkdir(exist_ok=True)
        tmp = SITE_STATE / f".{name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, SITE_STATE / name)

    # -- training -----------------------------------------------------------------------------

    def train_task(self, col_name, round_num, input_tensor_dict, epochs=1, **kwargs):
        self._train_seconds = 0.0
        self._round, self._epochs = int(round_num), int(epochs)
        # OpenFL calls train_() once per epoch; ours does the whole round (epochs or steps) in one call.
        global_out, local_out = super().train_task(col_name, round_num, input_tensor_dict, epochs=1, **kwargs)
        # Reported alongside the loss so the control plane can split round time into training vs overhead.
        global_out[TensorKey("train_seconds", col_name, round_num, True, ("metric",))] = np.array(self._train_seconds)
        for name, value in self._privacy_report.items():  # ε spent and what one more round would cost
            global_out[TensorKey(name, col_name, round_num, True, ("metric",))] = np.array(value)
        if self.site_local_names:
            self._save("fedbn.pt", {"round": self._round, "tensors": {
                k: v.detach().clone() for k, v in self.state_dict().items() if k in self.site_local_names}})
        return global_out, local_out

    def _loaders(self, first):
        yield first
        while True:
            yield self.data_loader.get_train_loader()

    def train_(self, train_dataloader) -> Metric:
        params = list(self.model.parameters())
        x_global = [p.detach().clone() for p in params]
        prox = ProximalTerm(self.model, self.params["mu"]) if self.algorithm == "fedprox" else None
        correction = c_site = None
        if self.algorithm == "scaffold":
            c_server = [p.detach().clone() for p in self.scaffold_c.parameters()]
            c_site = self._scaffold_site_variate(c_server)
            correction = [c - ci for c, ci in zip(c_server, c_site)]
        mode = self.privacy["mode"] if self.privacy else None
        if mode == "dp-sgd":
            result = self._train_dp_sgd(prox, correction)
        else:
            before = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if mode == "client-dp" else None
            if mode == "client-dp":
                self._check_site_budget()
            result = train_round(self.model, self._loaders(train_dataloader), self.optimizer, self.loss_fn,
                                 epochs=self._epochs, steps=self.local_steps, prox=prox, correction=correction)
            if mode == "client-dp":
                self._clip_update(before)
        self._train_seconds += result.seconds
        if self.algorithm == "scaffold":
            lr = self.params["local_lr"]
            new_c = [torch.from_numpy(scaffold.site_variate_update(ci.numpy(), c.numpy(), x.numpy(), p.detach().numpy(),
                                                                   result.steps, lr))
                     for ci, c, x, p in zip(c_site, c_server, x_global, params)]
            # Kept with its round: if this round is trained again after a restart, it starts from c_i, not c_i⁺.
            self._save("scaffold.pt", {"round": self._round, "before": c_site, "after": new_c})
            with torch.no_grad():  # what leaves the site: Δc_i = c_i⁺ − c_i
                for dst, a, b in zip(self.scaffold_c.parameters(), new_c, c_site):
                    dst.copy_(a - b)
        # Under DP the training loss stays at the site: it is a function of the training data that
        # the guarantee does not cover.
        return Metric(name="train_loss", value=np.array(float("nan") if self.privacy else result.loss))

    # -- differential privacy (sitekit.privacy) -------------------------------------------------

    def _budget(self):
        """This site's schedule: sampling rate, steps per round, noise multiplier (given or derived), δ."""
        key = (len(self.data_loader.train_set), self.data_loader.batch_size, self._epochs)
        if getattr(self, "_budget_cache", (None,))[0] != key:  # deriving the noise is a search: once per run
            self._budget_cache = (key, site_budget(self.privacy, key[0], key[1], key[2], self.local_steps, self.rounds or 1))
        return self._budget_cache[1]

    def _check_site_budget(self):
        """Refuse (before touching the data) a round that would exceed the target; returns (budget, accountant)."""
        b = self._budget()
        if self.privacy["mode"] == "client-dp" and b.noise_at != "site":
            return b, None  # noise is added (and accounted) at the aggregator
        acc = PrivacyAccountant.load(PRIVACY_STATE, b.accountant)
        after = acc.epsilon_after(b.delta, b.noise_multiplier, b.sample_rate, b.steps_per_round)
        if b.target_epsilon is not None and after > b.target_epsilon:
            raise PrivacyBudgetExceeded(
                f"site '{os.environ.get('FEDWARD_SITE', '?')}' refused round {self._round + 1}: it would spend ε = {after:.3f} "
                f"(δ = {b.delta:.3g}), beyond privacy.target_epsilon {b.target_epsilon}; nothing was trained or sent")
        return b, acc

    def _report_privacy(self, b, acc) -> None:
        eps = acc.epsilon(b.delta)
        nxt = acc.epsilon_after(b.delta, b.noise_multiplier, b.sample_rate, b.steps_per_round)
        self._privacy_report = {"epsilon": eps, "epsilon_next": nxt, "delta": b.delta,
                                "noise_multiplier": b.noise_multiplier, "sample_rate": b.sample_rate,
                                "privacy_steps": float(acc.steps)}
        log.info("privacy: ε = %.3f after round %d (δ = %.3g); one more round would reach %.3f", eps, self._round + 1, b.delta, nxt)

    def _train_dp_sgd(self, prox, correction):
        from sitekit.privacy.dpsgd import train_round_dp
        from sitekit.training import EpochResult

        b, acc = self._check_site_budget()

        def extra_gradient(ps):
            # data-independent terms, added after clipping and noise (see sitekit.privacy.dpsgd)
            terms = [torch.zeros_like(p) for p in ps]
            if prox is not None and prox.mu:
                terms = [t + prox.mu * (p.detach() - a) for t, p, a in zip(terms, ps, prox.anchor)]
            if correction is not None:
                terms = [t + c for t, c in zip(terms, correction)]
            return terms if (prox is not None or correction is not None) else None

        res = train_round_dp(self.model, self.data_loader.train_set, batch_size=self.data_loader.batch_size,
                             optimizer=self.optimizer, loss_fn=self.loss_fn, noise_multiplier=b.noise_multiplier,
                             max_grad_norm=b.clip, steps=b.steps_per_round, extra_gradient=extra_gradient)
        # Recorded (and fsynced) before the update can leave the site.
        acc.record(self._round, b.noise_multiplier, b.sample_rate, res.steps)
        self._report_privacy(b, acc)
        return EpochResult(res.loss, res.steps, res.seconds)

    def _clip_update(self, before: dict[str, torch.Tensor]) -> None:
        """client-dp: clip this site's update to clip_norm (and add the noise here for noise_at: site)."""
        b, acc = self._check_site_budget()
        state = self.model.state_dict()
        shared = [k for k, v in state.items() if k not in self.site_local_names and torch.is_floating_point(v)]
        clipped, norm = client_dp.clip_update({k: state[k] for k in shared}, {k: before[k] for k in shared}, b.clip)
        if b.noise_at == "site":
            from sitekit.privacy.dpsgd import secret_generator

            clipped = client_dp.add_site_noise(clipped, b.noise_multiplier * b.clip, secret_generator())
            acc.record(self._round, b.noise_multiplier, b.sample_rate, b.steps_per_round)
            self._report_privacy(b, acc)
        state.update(clipped)
        self.model.load_state_dict(state)
        log.info("client-dp: update norm %.4f clipped to %.4f", norm, min(norm, b.clip))  # stays in the site's log

    def _scaffold_site_variate(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        path = SITE_STATE / "scaffold.pt"
        if not path.exists():
            return [torch.zeros_like(t) for t in like]
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["before"] if int(saved["round"]) >= self._round else saved["after"]

    def validate_(self, validation_dataloader) -> Metric:
        return Metric(name=self.task.metric, value=np.array(self.task.evaluate_batches(self.model, validation_dataloader)))


SegmentationTaskRunner = FedwardTaskRunner  # the name plans written before the algorithms work used


# --------------------------------------------------------------------------- aggregator side

class FedwardAggregation(AggregationFunction):
    """The server half of every algorithm, called by OpenFL once per shared tensor per round.

    fedavg / fedprox / fedbn: case-weighted mean (FedBN's local tensors never arrive);
    scaffold: model x ← x + η_g (mean(y) − x); variate c ← c + (|S|/N) mean(Δc_i);
    fedadam / fedyogi: :class:`~sitekit.algorithms.fedadam.FedAdam` / :class:`~sitekit.algorithms.fedyogi.FedYogi` on the mean.

    Its state (the last global value of each tensor, the adaptive moments) is written per round
    under ``local_state/server/`` by :class:`FedwardAggregator` and reloaded after a restart.

    client-dp (:mod:`sitekit.privacy.client_dp`): the mean is over sites with equal weights and a
    fixed denominator (the number of sites), plus Gaussian noise z·S/K when the noise is added
    here (``noise_at: server``); the algorithm's server step then works on that noisy mean. Each
    tensor's release is computed once per round and cached, so a repeated call never draws new
    noise. ε is a function of the number of rounds released (persisted with the server state).
    """

    def __init__(self, algorithm: str = "fedavg", params: dict | None = None, n_sites: int = 1,
                 privacy: dict | None = None, rounds: int | None = None):
        super().__init__()
        self.algorithm, self.params, self.n_sites = algorithm, dict(params or {}), int(n_sites)
        self.privacy = dict(privacy) if privacy and privacy.get("mode") == "client-dp" else None
        self.budget = federation_budget(self.privacy, rounds or 1) if self.privacy else None
        self._released: dict[tuple[str, int], np.ndarray] = {}
        self._noise = client_dp.secret_rng()
        self.current: dict[str, np.ndarray] = {}  # the global value this function last produced, per tensor
        self.rounds_aggregated = 0
        self._last_round = None
        self.adaptive = None
        if algorithm in ("fedadam", "fedyogi"):
            p = self.params
            self.adaptive = (FedAdam if algorithm == "fedadam" else FedYogi)(
                lr=p["server_lr"], beta1=p["beta1"], beta2=p["beta2"], tau=p["tau"])

    def _global_now(self, name, db_iterator, fl_round):
        if name in self.current:
            return self.current[name]
        for record in db_iterator:  # round 0: the initial model
            tags = record["tags"]
            if record["tensor_name"] == name and record["round"] == fl_round and "trained" not in tags \
                    and "delta" not in tags and ("model" in tags or "aggregated" in tags):
                return np.array(record["nparray"])
        raise KeyError(f"no global value of tensor {name} for round {fl_round}")

    def call(self, local_tensors, db_iterator, tensor_name, fl_round, tags):
        if self._last_round != fl_round:
            self._last_round = fl_round
            self.rounds_aggregated += 1
        if (tensor_name, fl_round) in self._released:
            return self._released[(tensor_name, fl_round)]
        values = [np.asarray(t.tensor, dtype=np.float64) for t in local_tensors]
        weights = np.array([t.weight for t in local_tensors], dtype=np.float64)
        dtype = np.asarray(local_tensors[0].tensor).dtype
        if self.privacy is not None and np.issubdtype(dtype, np.floating):
            b = self.budget
            mean = client_dp.noisy_mean(values, self.n_sites, b.noise_multiplier * b.clip if b.noise_at == "server" else 0.0,
                                        self._noise)
        else:
            mean = sum(w * v for w, v in zip(weights / weights.sum(), values))
        if not np.issubdtype(dtype, np.floating):
            out = np.rint(mean)
        elif tensor_name.startswith(SCAFFOLD_PREFIX):
            c = np.asarray(self._global_now(tensor_name, db_iterator, fl_round), dtype=np.float64)
            out = scaffold.server_variate_update(c, values, self.n_sites)
        elif self.algorithm == "scaffold":
            x = np.asarray(self._global_now(tensor_name, db_iterator, fl_round), dtype=np.float64)
            out = x + self.params["server_lr"] * (mean - x)
        elif self.adaptive is not None:
            x = self._global_now(tensor_name, db_iterator, fl_round)
            out = self.adaptive.step(tensor_name, x, mean)
        else:
            out = mean
        out = np.asarray(out).astype(dtype)
        self.current[tensor_name] = out
        if self.privacy is not None:
            self._released = {k: v for k, v in self._released.items() if k[1] >= fl_round}
            self._released[(tensor_name, fl_round)] = out
        return out

    # -- state that must survive an aggregator restart --------------------------------------------

    def save(self, folder: Path, round_number: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"x/{k}": v for k, v in self.current.items()}
        if self.adaptive is not None:
            arrays.update({f"opt/{k}": v for k, v in self.adaptive.state().items()})
        arrays["meta/rounds_aggregated"] = np.array(self.rounds_aggregated)
        tmp = folder / f".round-{round_number}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, folder / f"round-{round_number}.npz")
        for old in folder.glob("round-*.npz"):  # keep this round and the one before
            if int(old.stem.split("-")[1]) < round_number - 1:
                old.unlink()

    def load(self, folder: Path, round_number: int) -> None:
        path = folder / f"round-{round_number}.npz"
        if not path.exists():
            raise RuntimeError(f"the aggregator is resuming after round {round_number + 1} but its {self.algorithm} "
                               f"server state ({path}) is missing; start the federation again rather than reset it")
        with np.load(path) as z:
            self.current = {k[2:]: z[k] for k in z.files if k.startswith("x/")}
            if self.adaptive is not None:
                self.adaptive.load({k[4:]: z[k] for k in z.files if k.startswith("opt/")})
            self.rounds_aggregated = int(z["meta/rounds_aggregated"])
        self._last_round = round_number

    def summary(self) -> dict:
        out = {"rounds_aggregated": self.rounds_aggregated}
        if self.adaptive is not None and self.adaptive.v:
            out["adaptive_v_mean"] = float(np.mean([np.mean(v) for v in self.adaptive.v.values()]))
        c = [v for k, v in self.current.items() if k.startswith(SCAFFOLD_PREFIX)]
        if c:
            out["scaffold_c_norm"] = float(np.sqrt(sum(float(np.sum(np.square(v))) for v in c)))
        if self.privacy is not None and self.budget.noise_at == "server":
            out["privacy_epsilon"] = self.budget.epsilon_after(self.rounds_aggregated)
            out["privacy_epsilon_next"] = self.budget.epsilon_after(self.rounds_aggregated + 1)
            out["privacy_delta"] = self.budget.delta
            out["privacy_noise_multiplier"] = self.budget.noise_multiplier
        return out


class EventLog:
    """Append-only JSON lines the control plane tails for progress (never raises)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()

    def emit(self, event: str, **fields) -> None:
        try:
            line = json.dumps({"event": event, "time": time.time(), **fields}, default=float)
            with self.lock, open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
        except Exception:  # an exception here would hang the federation
            log.exception("could not write event %s", event)


class _RoundEvents(Callback):
    def __init__(self, agg: "FedwardAggregator"):
        super().__init__()
        self.agg = agg

    def on_round_end(self, round_num, logs=None):
        try:
            sites: dict[str, dict[str, float]] = {}
            federation: dict[str, float] = {}
            while not self.agg.metric_queue.empty():
                m = self.agg.metric_queue.get_nowait()
                name = f"{m['task_name']}/{m['metric_name']}"
                if m["metric_origin"] == "aggregator":
                    if m["metric_name"] in PRIVACY_METRICS:
                        continue  # a case-weighted mean of the sites' ε is no one's guarantee
                    federation[name] = m["metric_value"]
                else:
                    sites.setdefault(m["metric_origin"], {})[name] = m["metric_value"]
            server = self.agg.aggregation.summary()
            self.agg.events.emit("round_end", round=int(round_num), federation=federation, sites=sites, server=server)
            self.agg.check_privacy_budget(int(round_num), sites, server)
        except Exception:
            log.exception("round-end bookkeeping failed")

    def on_experiment_end(self, logs=None):
        try:
            # OpenFL's last.pbuf holds the model that entered the last round; the aggregate of the
            # last round's updates sits in the tensor db as next round's model until clean-up.
            if self.agg.round_number >= self.agg.rounds_to_train:
                self.agg._save_model(self.agg.round_number, str(FINAL_MODEL))
                self.agg.events.emit("finished", rounds=int(self.agg.rounds_to_train), model=str(FINAL_MODEL),
                                     **({"stopped_for_privacy_budget": True, "planned_rounds": self.agg.planned_rounds}
                                        if self.agg.privacy_stop else {}))
            else:
                self.agg.events.emit("stopped_early", round=int(self.agg.round_number))
        except Exception:
            log.exception("could not save the final model")
            self.agg.events.emit("failed", reason="could not save the final model")


class FedwardAggregator(Aggregator):
    """OpenFL's aggregator plus progress events, round-boundary long-polling, the audit trail of every
    update it receives, and a refusal to start a round with a site whose agreement has lapsed."""

    def __init__(self, events_path: str = str(EVENTS), long_poll_seconds: float = 2.0, privacy: dict | None = None,
                 audit_path: str | None = None, agreements_valid_until: dict | None = None, **kwargs):
        self.events = EventLog(Path(events_path))
        self.privacy = privacy
        self.planned_rounds = int(kwargs.get("rounds_to_train", 1))
        self.privacy_stop = json.loads(PRIVACY_STOP.read_text()) if PRIVACY_STOP.exists() else None
        if self.privacy_stop:  # a restart after the budget stop must not train past it
            kwargs["rounds_to_train"] = int(self.privacy_stop["rounds_completed"])
        self.audit = AuditLog(audit_path) if audit_path else None
        self.agreements_valid_until = {k: dt.date.fromisoformat(v) for k, v in (agreements_valid_until or {}).items()}
        self.refused: str | None = None
        self.long_poll_seconds = long_poll_seconds
        self._progress = threading.Condition()
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _RoundEvents(self)]
        self.aggregation = kwargs["assigner"].get_aggregation_type_for_task("train")
        # OpenFL replays a half-finished round while it recovers (inside its __init__), so the
        # algorithm's server state must be back before that: read the last committed round first.
        committed = self._committed_round(kwargs.get("persistent_db_path"))
        if committed is not None:
            self.aggregation.load(SERVER_STATE, committed)
        super().__init__(**kwargs)
        self.events.emit("started", round=int(self.round_number), rounds=int(self.rounds_to_train),
                         resumed=committed is not None, server=self.aggregation.summary())

    @staticmethod
    def _committed_round(db_path) -> int | None:
        if not db_path or not Path(db_path).exists():
            return None
        from openfl.databases.persistent_db import PersistentTensorDB

        db = PersistentTensorDB(db_path)
        if not db.load_tensors(db.get_tensors_table_name()):
            return None
        return int(db.get_round_and_best_score()[0])

    def check_privacy_budget(self, round_num: int, sites: dict, server: dict) -> None:
        """After round ``round_num`` (0-based): end the federation here if the next round would exceed the target.

        The next round's ε comes from whoever spends it: each site's own accountant (dp-sgd, and
        client-dp with noise at the sites) reported as ``train/epsilon_next``, or this
        aggregator's (client-dp with noise here). A site that sent no such figure stops the run."""
        target = (self.privacy or {}).get("target_epsilon")
        if target is None or round_num + 1 >= self.rounds_to_train:
            return
        if self.privacy["mode"] == "client-dp" and self.privacy.get("noise_at") == "server":
            nxt = {"aggregator": float(server.get("privacy_epsilon_next", float("inf")))}
        else:
            nxt = {s: float(v.get("train/epsilon_next", float("inf"))) for s, v in sites.items()}
            nxt.update({s: float("inf") for s in self.authorized_cols if s not in nxt})
        who = max(nxt, key=nxt.get)
        if nxt[who] <= target:
            return
        self.privacy_stop = {"rounds_completed": round_num + 1, "planned_rounds": self.planned_rounds, "by": who,
                             "epsilon_next": nxt[who], "target_epsilon": target}
        _atomic_write(PRIVACY_STOP, json.dumps(self.privacy_stop))
        self.rounds_to_train = round_num + 1  # OpenFL ends the experiment as this round closes
        self.events.emit("privacy_budget_stop", round=round_num, **self.privacy_stop)

    def _save_model(self, round_number, file_path):
        if file_path == self.last_state_path:  # the round is being committed: commit ours with it
            self.aggregation.save(SERVER_STATE, int(round_number))
        return super()._save_model(round_number, file_path)

    def _record(self, kind: str, **data) -> None:
        if self.audit is None:
            return
        try:
            self.audit.append(kind, **data)
        except Exception:  # an exception inside an RPC handler would make the site retry forever
            log.exception("could not write audit record %s", kind)
            self.events.emit("failed", reason=f"the audit log {self.audit.path} cannot be written; stopping rather "
                                              "than receiving updates that are not recorded")
            self.refused = "audit log not writable"

    def _lapsed(self) -> tuple[str, str] | None:
        """(site, reason) for the first site whose agreement has lapsed: a round needs every site."""
        today = dt.date.today()
        for site, until in self.agreements_valid_until.items():
            if today > until:
                return site, (f"site '{site}': its data processing agreement expired on {until.isoformat()}; "
                              "no round is started with it (renew the agreement and ship a new plan)")
        return None

    def get_tasks(self, collaborator_name):
        if not self.refused and (lapsed := self._lapsed()):
            self.refused = lapsed[1]
            self.events.emit("failed", reason=lapsed[1])
            self._record("round_refused", site=lapsed[0], round=int(self.round_number), reason=lapsed[1])
        if self.refused:
            return [], self.round_number, 1, False
        # Instead of telling an idle site to sleep 10 s, wait (bounded) for the round to move on.
        deadline = time.monotonic() + self.long_poll_seconds
        while True:
            tasks, rnd, sleep_time, quit_ = super().get_tasks(collaborator_name)
            if tasks:
                self.events.emit("assigned", site=collaborator_name, round=int(rnd))
            left = deadline - time.monotonic()
            if tasks or quit_ or left <= 0:
                return tasks, rnd, (min(sleep_time, 1) if not tasks and not quit_ else sleep_time), quit_
            with self._progress:
                self._progress.wait(timeout=left)

    def _dp_applied(self, task_name: str, named_tensors) -> dict | None:
        """The DP parameters a training update was made under: the plan's settings and, where the site
        accounts for itself (dp-sgd; client-dp with noise at the site), the σ, sampling rate, δ and ε it
        reported with the update. None for evaluation results and federations without DP."""
        if self.privacy is None or task_name != "train":
            return None
        p = self.privacy
        dp = {"mode": p["mode"], "clip": p["clip"], "noise_at": p.get("noise_at", "site"),
              "noise_multiplier": p.get("noise_multiplier"), "target_epsilon": p.get("target_epsilon")}
        for t in named_tensors:
            if not t.report or t.name not in PRIVACY_METRICS:
                continue
            try:
                key = TensorKey(t.name, self.uuid, t.round_number, t.report, tuple(t.tags))
                meta = [{"int_to_float": m.int_to_float, "int_list": m.int_list, "bool_list": m.bool_list}
                        for m in t.transformer_metadata]
                _, value = self.tensor_codec.decompress(key, data=t.data_bytes, transformer_metadata=meta,
                                                        require_lossless=True)
                dp[f"site_{t.name}"] = float(np.asarray(value).reshape(-1)[0])
            except Exception:  # the record is still written, without the figure
                log.exception("could not read the privacy figure %s from an update", t.name)
        return dp

    def send_local_task_results(self, collaborator_name, round_number, task_name, data_size, named_tensors):
        nbytes = sum(len(t.data_bytes) for t in named_tensors)
        # What arrived, exactly: one digest over every tensor's name, tags and bytes (for the audit log).
        digest = tensors_digest((f"{t.name}|{','.join(t.tags)}", t.data_bytes) for t in named_tensors)
        super().send_local_task_results(collaborator_name, round_number, task_name, data_size, named_tensors)
        self.events.emit("result", site=collaborator_name, round=int(round_number), task=task_name, bytes=int(nbytes),
                         tensors=len(named_tensors), sha256=digest, data_size=int(data_size))
        # Recorded where it arrives, as it arrives, with the DP the update was trained under.
        self._record("update_received", site=collaborator_name, round=int(round_number), task=task_name,
                     bytes=int(nbytes), tensors=len(named_tensors), sha256=digest, cases=int(data_size),
                     dp=self._dp_applied(task_name, named_tensors))
        with self._progress:
            self._progress.notify_all()


# --------------------------------------------------------------------------- processes

def _status(code: int, reason: str, **extra) -> int:
    _atomic_write(STATUS, json.dumps({"exit": code, "reason": reason, **extra}))
    print(f"fedward: {reason}", file=sys.stderr, flush=True)
    return code


def run_aggregator(bind: str = "localhost") -> int:
    """Serve the federation from the current folder until every site has been told to quit."""
    Path("local_state").mkdir(exist_ok=True)
    Path("save").mkdir(exist_ok=True)
    plan = Plan.parse(PLAN, COLS)
    server = plan.get_server()  # builds FedwardAggregator from the plan
    agg = server.aggregator
    port = plan.config["network"]["settings"]["agg_port"]
    grpc_server = create_grpc_server(f"{bind}:{port}", server.use_tls, server.private_key, server.certificate,
                                     server.root_certificate, server.require_client_auth)
    aggregator_pb2_grpc.add_AggregatorServicer_to_server(server, grpc_server)
    grpc_server.start()
    agg.events.emit("listening", address=f"{bind}:{port}")
    while not agg.all_quit_jobs_sent() and not agg.refused:
        time.sleep(0.1)
    grpc_server.stop(grace=2).wait()
    agg.events.emit("stopped")
    if agg.refused:
        return _status(EXIT_REFUSED, agg.refused)
    return 0


def _check_admission(plan: Plan, name: str, timeout: float) -> None:
    """One authenticated Ping, retried only while the aggregator is unreachable (bounded)."""
    import grpc

    net = plan.config["network"]["settings"]
    uri = f"{net['agg_addr']}:{net['agg_port']}"
    paths = participant_layout(Path("."), "site", name)
    if net.get("use_tls", True):
        channel = create_tls_channel(uri, str(paths["chain"]), net.get("require_client_auth", True),
                                     str(paths["cert"]), str(paths["key"]))
    else:
        channel = grpc.insecure_channel(uri)
    stub = aggregator_pb2_grpc.AggregatorStub(channel)
    header = create_header(sender=name, receiver=plan.aggregator_uuid, federation_uuid=plan.federation_uuid,
                           single_col_cert_common_name="")
    deadline = time.monotonic() + timeout
    last = None
    try:
        while time.monotonic() < deadline:
            try:
                stub.Ping(aggregator_pb2.PingRequest(header=header), timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                return
            except grpc.RpcError as exc:
                last = exc
                details = (exc.details() or "").lower()
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise PermissionError(f"the aggregator refused site '{name}': {exc.details()}") from None
                if exc.code() == grpc.StatusCode.UNKNOWN and "not authorized" in details:
                    raise PermissionError(f"the aggregator refused site '{name}': {exc.details()}") from None
                if exc.code() == grpc.StatusCode.UNAVAILABLE and net.get("use_tls", True):
                    # gRPC hides a refused certificate behind "unavailable": ask TLS directly.
                    ok, what = tls_probe(net["agg_addr"], int(net["agg_port"]), str(paths["chain"]),
                                         str(paths["cert"]), str(paths["key"]))
                    if not ok and ("TLS handshake" in what or "not trusted" in what):
                        raise PermissionError(f"site '{name}': {what}") from None
                time.sleep(0.5)
    finally:
        channel.close()
    detail = last.details() if last is not None else "no answer"
    raise ConnectionError(f"site '{name}' could not reach the aggregator at {uri} within {timeout:.0f} s: {detail}")


def measure_link(folder: Path, name: str, payload_bytes: int = 4 << 20, pings: int = 5,
                 timeout: float = 30.0) -> dict:
    """Round-trip time and upload rate from site ``name`` to its aggregator, over the federation's own
    channel (gRPC, mutual TLS, and whatever proxy gRPC takes from the environment).

    Uses the aggregator's authenticated Ping: ``pings`` empty ones for the round trip, then one that
    carries ``payload_bytes`` of padding in a field the aggregator ignores (protobuf keeps unknown
    fields), which times an upload the size of a model update. Nothing is stored at the aggregator.
    Raises ConnectionError / PermissionError with the aggregator's answer."""
    import grpc

    folder = Path(folder)
    plan = Plan.parse(folder / PLAN, folder / COLS)
    net = plan.config["network"]["settings"]
    uri = f"{net['agg_addr']}:{net['agg_port']}"
    paths = participant_layout(folder, "site", name)
    channel = create_tls_channel(uri, str(paths["chain"]), True, str(paths["cert"]), str(paths["key"]))
    header = create_header(sender=name, receiver=plan.aggregator_uuid, federation_uuid=plan.federation_uuid,
                           single_col_cert_common_name="")
    request = aggregator_pb2.PingRequest(header=header).SerializeToString()
    call = channel.unary_unary("/openfl.aggregator.Aggregator/Ping", request_serializer=None,
                               response_deserializer=aggregator_pb2.PingResponse.FromString)

    def _varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    # field 2047, wire type 2 (length-delimited): a field PingRequest does not have
    padded = request + _varint(2047 << 3 | 2) + _varint(payload_bytes) + bytes(payload_bytes)
    try:
        rtts = []
        for _ in range(max(1, pings)):
            t = time.monotonic()
            call(request, timeout=timeout)
            rtts.append(time.monotonic() - t)
        t = time.monotonic()
        call(padded, timeout=timeout)
        upload = time.monotonic() - t
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNKNOWN):
            raise PermissionError(f"the aggregator refused site '{name}': {exc.details()}") from None
        raise ConnectionError(f"site '{name}' could not talk to the aggregator at {uri}: {exc.details()}") from None
    finally:
        channel.close()
    rtt = sorted(rtts)[len(rtts) // 2]
    # the padded call costs one round trip plus the transfer itself
    return {"rtt_ms": rtt * 1000, "rtt_all_ms": [r * 1000 for r in rtts], "upload_bytes": payload_bytes,
            "upload_seconds": upload, "upload_mbit_s": payload_bytes * 8 / max(upload - rtt, 1e-6) / 1e6}


def run_collaborator(name: str, admission_timeout: float = 30.0) -> int:
    """Join the federation as site ``name`` from the current folder (the site's workspace)."""
    os.environ["FEDWARD_SITE"] = name
    plan = Plan.parse(PLAN, COLS, DATA)
    try:
        _check_admission(plan, name, admission_timeout)
    except PermissionError as exc:
        return _status(EXIT_REFUSED, str(exc))
    except ConnectionError as exc:
        return _status(EXIT_UNREACHABLE, str(exc))
    try:
        collaborator = plan.get_collaborator(name)  # loads the site's data
    except DataError as exc:
        return _status(EXIT_DATA, str(exc))
    try:
        collaborator.run()
    except PrivacyBudgetExceeded as exc:
        return _status(EXIT_PRIVACY, str(exc))
    _atomic_write(STATUS, json.dumps({"exit": 0, "reason": "finished"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sitekit.engine.openfl_adapter")
    sub = ap.add_subparsers(dest="role", required=True)
    a = sub.add_parser("aggregator")
    a.add_argument("--bind", default="localhost", help="address to listen on (default: loopback only, IPv4 and IPv6)")
    c = sub.add_parser("collaborator")
    c.add_argument("--name", required=True)
    c.add_argument("--admission-timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("FEDWARD_TORCH_THREADS", "1")))
    logging.basicConfig(level=os.environ.get("FEDWARD_LOG_LEVEL", "INFO"))
    try:
        if args.role == "aggregator":
            return run_aggregator(args.bind)
        return run_collaborator(args.name, args.admission_timeout)
    except Exception as exc:  # say what broke, in one line, where the supervisor looks
        log.exception("participant crashed")
        return _status(EXIT_CRASH, f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
