"""FedAdam's server step against hand-computed values."""
import numpy as np

from sitekit.algorithms.fedadam import FedAdam


def test_fedadam_two_steps_by_hand():
    s = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    new = s.step("w", np.array([1.0]), np.array([3.0]))  # Δ = 2
    m1, v1 = 0.1 * 2, 0.99 * 1e-4 + 0.01 * 4
    x1 = 1.0 + 0.1 * m1 / (np.sqrt(v1) + 0.01)
    np.testing.assert_allclose(new, [x1])
    # second round: the sites average back to 1.0, Δ = 1 - x1 < 0; momentum keeps some of round 1
    new2 = s.step("w", new, np.array([1.0]))
    d = 1.0 - x1
    m2, v2 = 0.9 * m1 + 0.1 * d, 0.99 * v1 + 0.01 * d * d
    np.testing.assert_allclose(new2, [x1 + 0.1 * m2 / (np.sqrt(v2) + 0.01)])
    np.testing.assert_allclose(s.m["w"], [m2])
    np.testing.assert_allclose(s.v["w"], [v2])


def test_fedadam_keeps_dtype_and_tensors_apart():
    s = FedAdam()
    out = s.step("a", np.zeros(3, dtype=np.float32), np.ones(3, dtype=np.float32))
    assert out.dtype == np.float32
    s.step("b", np.zeros(2), np.full(2, -1.0))
    assert set(s.m) == {"a", "b"} and s.m["a"].shape == (3,) and (s.m["b"] < 0).all()


def test_fedadam_state_round_trips():
    a = FedAdam()
    a.step("w", np.zeros(3), np.ones(3))
    b = FedAdam()
    b.load(a.state())
    np.testing.assert_allclose(a.step("w", np.ones(3), np.full(3, 2.0)), b.step("w", np.ones(3), np.full(3, 2.0)))
