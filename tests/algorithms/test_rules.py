"""Each algorithm's update rule, checked by hand on tiny tensors."""
import numpy as np
import pytest
import torch

from sitekit.algorithms import fedavg, fedbn, fedprox, scaffold
from sitekit.algorithms.adaptive import AdaptiveServer


def test_fedavg_weights_by_case_count():
    out = fedavg.weighted_mean([({"w": np.array([0.0, 4.0])}, 1), ({"w": np.array([4.0, 8.0])}, 3)])
    np.testing.assert_allclose(out["w"], [3.0, 7.0])  # (1*0 + 3*4)/4, (1*4 + 3*8)/4


def test_fedprox_term_and_its_gradient():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight[:] = torch.tensor([[1.0, 2.0]])
    prox = fedprox.ProximalTerm(model, mu=0.5)
    with torch.no_grad():
        model.weight[:] = torch.tensor([[3.0, -1.0]])  # moved by (2, -3)
    term = prox(model)
    assert float(term.detach()) == pytest.approx(0.25 * (4 + 9))  # mu/2 * ||Δ||²
    term.backward()
    np.testing.assert_allclose(model.weight.grad.numpy(), [[1.0, -1.5]])  # mu * Δ
    assert float(fedprox.ProximalTerm(model, mu=0.0)(model)) == 0.0


def test_fedadam_step_by_hand():
    s = AdaptiveServer("adam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    x = np.array([1.0])
    new = s.step("w", x, np.array([3.0]))  # Δ = 2
    m, v = 0.1 * 2, 0.99 * 1e-4 + 0.01 * 4
    np.testing.assert_allclose(new, 1.0 + 0.1 * m / (np.sqrt(v) + 0.01))


def test_fedyogi_differs_from_adam_by_its_second_moment():
    s = AdaptiveServer("yogi", lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    new = s.step("w", np.array([1.0]), np.array([3.0]))
    v = 1e-4 - 0.01 * 4 * np.sign(1e-4 - 4)  # v grows additively: 1e-4 + 0.04
    np.testing.assert_allclose(new, 1.0 + 0.1 * 0.2 / (np.sqrt(v) + 0.01))
    np.testing.assert_allclose(s.v["w"], [v])


def test_adaptive_state_round_trips():
    a = AdaptiveServer("adam")
    a.step("w", np.zeros(3), np.ones(3))
    b = AdaptiveServer("adam")
    b.load(a.state())
    np.testing.assert_allclose(a.step("w", np.ones(3), np.full(3, 2.0)), b.step("w", np.ones(3), np.full(3, 2.0)))


def test_scaffold_variates_by_hand():
    g = scaffold.corrected_gradient(np.array([1.0]), c_site=np.array([0.5]), c_server=np.array([0.2]))
    np.testing.assert_allclose(g, [0.7])
    c_new = scaffold.site_variate_update(np.array([0.5]), np.array([0.2]), x_global=np.array([1.0]),
                                         y_local=np.array([0.6]), steps=4, lr=0.1)
    np.testing.assert_allclose(c_new, [0.5 - 0.2 + 0.4 / 0.4])
    x, c = scaffold.server_update(np.array([1.0]), np.array([0.2]), [np.array([-0.4]), np.array([0.2])],
                                  [np.array([0.8]), np.array([0.0])], n_sites=4, server_lr=1.0)
    np.testing.assert_allclose(x, [0.9])
    np.testing.assert_allclose(c, [0.2 + 0.5 * 0.4])


def test_fedbn_keeps_normalisation_layers_local():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.Conv3d(2, 1, 1))
    local = fedbn.local_tensor_names(model)
    assert local == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    site = {k: torch.full_like(v, 1) for k, v in model.state_dict().items()}
    glob = {k: torch.full_like(v, 2) for k, v in model.state_dict().items()}
    merged = fedbn.merge_global(site, glob, local)
    assert all(torch.equal(merged[k], site[k]) for k in local)
    assert all(torch.equal(merged[k], glob[k]) for k in merged if k not in local)


def test_scaffold_server_variate_counts_only_reporting_sites():
    c = np.array([1.0, 1.0])
    out = scaffold.server_variate_update(c, [np.array([2.0, 0.0]), np.array([0.0, 4.0])], n_sites=4)
    np.testing.assert_allclose(out, [1.0 + 0.5 * 1.0, 1.0 + 0.5 * 2.0])  # (2/4) * mean
