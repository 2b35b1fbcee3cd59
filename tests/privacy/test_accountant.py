"""The privacy accountant: the same ε as Opacus's own accountant for the same training, the right
numbers where a closed form exists, and a spent budget that survives a restart."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from sitekit.classification import ImageSet, bce_loss, build_cnn
from sitekit.privacy import PrivacyAccountant, epsilon_for, noise_multiplier_for, site_budget
from sitekit.privacy.accountant import AccountantMismatch
from sitekit.privacy.dpsgd import train_round_dp


def _opacus_engine_epsilons(dataset, batch_size, noise, clip, steps, delta):
    """Train with Opacus's PrivacyEngine exactly as its tutorials do; return its accountants' ε and history."""
    from opacus import PrivacyEngine

    out = {}
    for kind in ("rdp", "prv"):
        model = build_cnn(seed=0)
        engine = PrivacyEngine(accountant=kind)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                             data_loader=loader, noise_multiplier=noise, max_grad_norm=clip)
            taken = 0
            while taken < steps:
                for x, y in dl:
                    if taken >= steps:
                        break
                    opt.zero_grad()
                    if len(x):
                        bce_loss()(m(x), y).backward()
                    else:  # an empty Poisson batch: Opacus still takes (and accounts) a noise-only step
                        for p in model.parameters():
                            p.grad_sample = torch.zeros((0, *p.shape))
                    opt.step()
                    taken += 1
        out[kind] = (engine.accountant.get_epsilon(delta=delta), list(engine.accountant.history))
    return out


def test_accountant_agrees_with_opacus_privacy_engine_for_the_same_training(pneumonia_pool, tmp_path):
    """45 real images, batch 4 (12 batches per epoch, so q = 1/12), two 'rounds' of 20 and 16 DP-SGD
    steps through our training step, recorded to a JSON file and reloaded, against Opacus's
    PrivacyEngine running the same 36 steps with its own accountant."""
    torch.set_num_threads(1)
    data = torch.utils.data.Subset(ImageSet("hospital-c", pneumonia_pool["hospital-c"], "train"), range(45))
    noise, clip, delta = 1.3, 0.8, 1e-5
    model = build_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "site_state" / "privacy.json"
    for rnd, steps in enumerate((20, 16)):
        acc = PrivacyAccountant.load(path, "rdp")  # as a site does every round (and after a restart)
        res = train_round_dp(model, data, batch_size=4, optimizer=opt, loss_fn=bce_loss(), noise_multiplier=noise,
                             max_grad_norm=clip, steps=steps)
        assert res.steps == steps
        acc.record(rnd, noise, 1 / 12, res.steps)
    ours = PrivacyAccountant.load(path, "rdp")
    theirs = _opacus_engine_epsilons(data, 4, noise, clip, 36, delta)
    assert ours.history == [(noise, pytest.approx(1 / 12), 36)]
    assert theirs["rdp"][1] == [(noise, pytest.approx(1 / 12), 36)]
    assert ours.epsilon(delta) == pytest.approx(theirs["rdp"][0], rel=1e-9)
    prv = PrivacyAccountant("prv")
    prv.releases = ours.releases
    assert prv.epsilon(delta) == pytest.approx(theirs["prv"][0], rel=1e-6)
    assert 0 < prv.epsilon(delta) < ours.epsilon(delta)  # PRV is the tighter bound


def test_rdp_equals_the_gaussian_mechanism_closed_form():
    """q = 1 (client-dp, every site every round): T Gaussian releases have RDP T·α/(2σ²) at order α,
    converted to (ε, δ) as Balle et al. 2020 do; computed here independently of Opacus."""
    from opacus.accountants import RDPAccountant

    sigma, rounds, delta = 1.7, 7, 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = rounds * alphas / (2 * sigma ** 2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    assert epsilon_for([(sigma, 1.0, rounds)], delta, "rdp") == pytest.approx(float(np.nanmin(eps)), rel=1e-9)


def test_prv_matches_the_exact_gaussian_curve():
    """T Gaussian releases of noise σ are exactly a μ-GDP mechanism with μ = √T/σ, whose δ(ε) is
    Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang 2018; Dong, Roth, Su 2019). PRV is an upper
    bound within its error; RDP is a looser upper bound."""
    sigma, rounds, delta = 2.0, 9, 1e-5
    mu = math.sqrt(rounds) / sigma
    exact = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 1e-6, 50)
    prv = epsilon_for([(sigma, 1.0, rounds)], delta, "prv")
    rdp = epsilon_for([(sigma, 1.0, rounds)], delta, "rdp")
    assert exact <= prv <= exact + 0.05
    assert prv < rdp < 1.3 * exact


def test_spent_budget_survives_a_restart_and_refuses_another_accountant(tmp_path):
    path = tmp_path / "site_state" / "privacy.json"
    first = PrivacyAccountant.load(path, "rdp")
    assert first.epsilon(1e-5) == 0.0 and not path.exists()
    first.record(0, 1.0, 0.05, 40)
    first.record(1, 1.0, 0.05, 40)
    again = PrivacyAccountant.load(path, "rdp")  # a new process reading the site's file
    assert again.steps == 80 and again.history == [(1.0, 0.05, 80)]
    assert again.epsilon(1e-5) == pytest.approx(epsilon_for([(1.0, 0.05, 80)], 1e-5))
    assert again.epsilon_after(1e-5, 1.0, 0.05, 40) == pytest.approx(epsilon_for([(1.0, 0.05, 120)], 1e-5))
    assert again.steps == 80  # a prediction records nothing
    saved = json.loads(path.read_text())
    assert saved["accountant"] == "rdp" and [r["round"] for r in saved["releases"]] == [0, 1]
    assert [p.name for p in path.parent.iterdir()] == ["privacy.json"]  # no temp file left behind
    with pytest.raises(AccountantMismatch, match="rdp"):
        PrivacyAccountant.load(path, "prv")
    with pytest.raises(ValueError):
        again.record(2, 1.0, 1.5, 3)  # a sampling rate above 1 is not a mechanism


def test_noise_multiplier_derived_from_the_target_meets_it():
    b = site_budget({"mode": "dp-sgd", "clip": 1.0, "noise_multiplier": None, "target_epsilon": 4.0, "delta": 1e-5},
                    n_train=1036, batch_size=64, epochs=2, local_steps=None, rounds=5)
    assert b.noise_derived and b.sample_rate == pytest.approx(1 / 17) and b.steps_per_round == 34
    assert 3.95 <= b.epsilon_after(5) <= 4.0
    assert b.noise_multiplier == pytest.approx(noise_multiplier_for(4.0, 1e-5, 1 / 17, 170))
    # a little less noise would overspend
    assert epsilon_for([(b.noise_multiplier * 0.97, 1 / 17, 170)], 1e-5) > 4.0


def test_budget_schedule_and_rounds_within_budget():
    p = {"mode": "dp-sgd", "clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": None, "delta": None}
    b = site_budget(p, n_train=198, batch_size=32, epochs=1, local_steps=None, rounds=6)
    assert b.delta == pytest.approx(1 / 198) and b.delta_default
    assert b.sample_rate == pytest.approx(1 / 7) and b.steps_per_round == 7
    eps = b.schedule()
    assert all(a < c for a, c in zip(eps, eps[1:]))  # every round spends something
    target = (eps[2] + eps[3]) / 2
    limited = site_budget({**p, "target_epsilon": target}, 198, 32, 1, None, 6)
    assert limited.rounds_within_budget() == 3
    assert site_budget({**p, "target_epsilon": eps[0] / 2}, 198, 32, 1, None, 6).rounds_within_budget() == 0
    assert site_budget({**p, "target_epsilon": 1e3}, 198, 32, 1, None, 6).rounds_within_budget() == 6
    steps = site_budget(p, 198, 32, 1, 5, 6)  # local_steps overrides epochs
    assert steps.steps_per_round == 5 and steps.sample_rate == pytest.approx(1 / 7)
