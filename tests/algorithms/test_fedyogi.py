"""FedYogi's second moment: additive, signed, unlike Adam's moving average."""
import numpy as np

from sitekit.algorithms.fedadam import FedAdam
from sitekit.algorithms.fedyogi import FedYogi


def test_fedyogi_step_by_hand():
    s = FedYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    new = s.step("w", np.array([1.0]), np.array([3.0]))  # Δ = 2, Δ² = 4 > v0 = 1e-4
    v = 1e-4 - 0.01 * 4 * np.sign(1e-4 - 4)  # v grows additively: 1e-4 + 0.04
    np.testing.assert_allclose(new, 1.0 + 0.1 * 0.2 / (np.sqrt(v) + 0.01))
    np.testing.assert_allclose(s.v["w"], [v])


def test_fedyogi_shrinks_v_when_updates_get_small():
    s = FedYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    s.step("w", np.array([0.0]), np.array([2.0]))  # v = 1e-4 + 0.04
    v1 = float(s.v["w"][0])
    s.step("w", np.array([0.0]), np.array([0.01]))  # Δ² = 1e-4 < v1: v decreases by (1-β2)Δ²
    np.testing.assert_allclose(s.v["w"], [v1 - 0.01 * 1e-4])
    a = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    a.step("w", np.array([0.0]), np.array([2.0]))
    a.step("w", np.array([0.0]), np.array([0.01]))
    assert float(a.v["w"][0]) < float(s.v["w"][0])  # Adam forgets faster (multiplicative decay)
