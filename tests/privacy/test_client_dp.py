"""Client-level DP-FedAvg (McMahan et al. 2018): the clip and noise rule on tiny tensors, and the
server half as OpenFL calls it."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch

from sitekit.privacy import client_dp, epsilon_for

Local = namedtuple("Local", "col_name tensor weight")


def test_update_is_clipped_jointly_over_all_tensors():
    old = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    new = {"w": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}  # update (3, 0, 4): norm 5
    clipped, norm = client_dp.clip_update(new, old, clip_norm=1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["w"], torch.tensor([1.6, 1.0]))  # old + update * 1/5
    torch.testing.assert_close(clipped["b"], torch.tensor([0.8]))
    assert client_dp.update_norm(clipped, old) == pytest.approx(1.0)
    small, norm = client_dp.clip_update(new, old, clip_norm=10.0)  # within the bound: unchanged
    assert norm == pytest.approx(5.0) and all(torch.equal(small[k], new[k]) for k in new)
    same, norm = client_dp.clip_update(old, old, clip_norm=1.0)
    assert norm == 0.0 and all(torch.equal(same[k], old[k]) for k in old)
    with pytest.raises(ValueError):
        client_dp.clip_update(new, old, clip_norm=0.0)


def test_server_mean_has_a_fixed_denominator_and_noise_z_s_over_k():
    rng = np.random.default_rng(0)
    values = [np.full(3, 1.0), np.full(3, 2.0), np.full(3, 6.0)]
    np.testing.assert_allclose(client_dp.noisy_mean(values, 3, 0.0, rng), [3.0, 3.0, 3.0])
    # two of four sites sent: still divided by 4 (the fixed-denominator estimator, w_k = 1)
    np.testing.assert_allclose(client_dp.noisy_mean(values[:2], 4, 0.0, rng), [0.75, 0.75, 0.75])
    zeros = [np.zeros(200_000)] * 3
    noisy = client_dp.noisy_mean(zeros, 3, noise_std=1.5 * 0.4, rng=rng)  # z = 1.5, S = 0.4
    assert noisy.std() == pytest.approx(1.5 * 0.4 / 3, rel=0.01)


def test_site_noise_has_std_z_s_on_every_tensor():
    g = torch.Generator().manual_seed(1)
    out = client_dp.add_site_noise({"a": torch.zeros(100_000), "b": torch.zeros(50, 1000)}, std=0.3, generator=g)
    assert float(out["a"].std()) == pytest.approx(0.3, rel=0.02)
    assert float(out["b"].std()) == pytest.approx(0.3, rel=0.02) and out["b"].shape == (50, 1000)


def _aggregation(noise_at="server", z=2.0, clip=0.5, n_sites=3, rounds=4, algorithm="fedavg", params=None):
    from sitekit.engine.openfl_adapter import FedwardAggregation

    # OpenFL's aggregation functions are one instance per process (a singleton metaclass): start afresh
    type(FedwardAggregation)._instances.pop(FedwardAggregation, None)
    privacy = {"mode": "client-dp", "clip": clip, "noise_multiplier": z, "target_epsilon": None, "delta": 1e-5,
               "noise_at": noise_at, "accountant": "rdp"}
    return FedwardAggregation(algorithm=algorithm, params=params or {}, n_sites=n_sites, privacy=privacy, rounds=rounds)


def test_aggregation_with_server_noise_ignores_case_weights_and_releases_each_tensor_once():
    agg = _aggregation()
    locals_ = [Local("a", np.zeros(100_000, dtype=np.float32), 1000.0), Local("b", np.full(100_000, 3.0, np.float32), 10.0),
               Local("c", np.full(100_000, 6.0, np.float32), 1.0)]
    out = agg.call(locals_, iter([]), "model.w", 0, ())
    assert out.dtype == np.float32
    assert float(out.mean()) == pytest.approx(3.0, abs=0.01)  # equal weights, not 1000:10:1
    assert float(out.std()) == pytest.approx(2.0 * 0.5 / 3, rel=0.02)  # z·S/K
    again = agg.call(locals_, iter([]), "model.w", 0, ())
    assert np.array_equal(out, again)  # the same release, never a second noisy look
    ints = agg.call([Local("a", np.array([2]), 1.0), Local("b", np.array([4]), 1.0)], iter([]), "model.n", 0, ())
    assert ints.tolist() == [3]  # integer tensors (counters) are not noised
    s = agg.summary()
    assert s["rounds_aggregated"] == 1
    assert s["privacy_epsilon"] == pytest.approx(epsilon_for([(2.0, 1.0, 1)], 1e-5))
    assert s["privacy_epsilon_next"] == pytest.approx(epsilon_for([(2.0, 1.0, 2)], 1e-5))


def test_aggregation_with_site_noise_adds_none_and_reports_no_server_epsilon():
    agg = _aggregation(noise_at="site")
    locals_ = [Local(c, np.full(1000, v, np.float32), 1.0) for c, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    out = agg.call(locals_, iter([]), "model.w", 0, ())
    np.testing.assert_allclose(out, 2.0)
    assert "privacy_epsilon" not in agg.summary()  # the sites account for their own noise


def test_fedadam_steps_on_the_noisy_mean():
    from sitekit.algorithms.fedadam import FedAdam

    agg = _aggregation(algorithm="fedadam", params={"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}, z=1e-9)
    agg.current["model.w"] = np.zeros(4)
    out = agg.call([Local(c, np.full(4, 1.0), 1.0) for c in "abc"], iter([]), "model.w", 0, ())
    ref = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3).step("model.w", np.zeros(4), np.full(4, 1.0))
    np.testing.assert_allclose(out, ref, rtol=1e-6)


@pytest.mark.parametrize("noise_at", ["server", "site"])
def test_site_clips_its_update_and_adds_noise_only_when_told(noise_at, pneumonia_pool, tmp_path, monkeypatch):
    """The site half of client-dp, on a real site's task runner: a large update is clipped to S over all
    tensors; with noise_at: site the update that leaves carries N(0, (zS)²) per parameter and the
    site's own accountant records one release; with noise_at: server it leaves clipped, unnoised."""
    from sitekit.engine.openfl_adapter import PRIVACY_STATE, FedwardTaskRunner, SiteDataLoader

    monkeypatch.chdir(tmp_path)  # a site's state lives in its working folder
    task = {"kind": "classification", "dataset": None, "model": {"name": "cnn2d", "channels": [8, 8, 8], "strides": [2, 2],
            "res_units": 0, "norm": "group"}, "loss": "bce", "metric": "auc", "input_size": [28, 28],
            "normalize": "zscore", "label": "foreground", "standardise": "site", "feature_stats": None}
    z, clip = 0.8, 0.05
    privacy = {"mode": "client-dp", "clip": clip, "noise_multiplier": z, "target_epsilon": None, "delta": 1e-5,
               "noise_at": noise_at, "accountant": "rdp"}
    loader = SiteDataLoader(data_path=str(pneumonia_pool["hospital-c"]), batch_size=32, task=task)
    runner = FedwardTaskRunner(task=task, learning_rate=0.001, privacy=privacy, rounds=3, data_loader=loader)
    runner._round, runner._epochs = 0, 1
    before = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    with torch.no_grad():
        for p in runner.model.parameters():
            p.add_(0.01)  # an "update" of norm 0.01·√d, far above S
    runner._clip_update(before)
    after = runner.model.state_dict()
    delta = torch.cat([(after[k] - before[k]).reshape(-1) for k in before]).double()
    d = delta.numel()
    if noise_at == "server":
        assert float(delta.norm()) == pytest.approx(clip, rel=1e-5)
        assert float(delta.std()) < 1e-3 and not PRIVACY_STATE.exists() and runner._privacy_report == {}
    else:
        assert float(delta.std()) == pytest.approx(z * clip, rel=0.05) and d > 3000
        saved = PRIVACY_STATE.read_text()
        assert '"steps": 1' in saved and '"sample_rate": 1.0' in saved
        assert runner._privacy_report["epsilon"] == pytest.approx(epsilon_for([(z, 1.0, 1)], 1e-5))
        assert runner._privacy_report["epsilon_next"] == pytest.approx(epsilon_for([(z, 1.0, 2)], 1e-5))
