"""FedAvg's rule on tiny tensors."""
import numpy as np
import pytest

from sitekit.algorithms import fedavg


def test_fedavg_weights_by_case_count():
    out = fedavg.weighted_mean([({"w": np.array([0.0, 4.0])}, 1), ({"w": np.array([4.0, 8.0])}, 3)])
    np.testing.assert_allclose(out["w"], [3.0, 7.0])  # (1*0 + 3*4)/4, (1*4 + 3*8)/4


def test_fedavg_refuses_nothing_to_average():
    with pytest.raises(ValueError):
        fedavg.weighted_mean([])
    with pytest.raises(ValueError):
        fedavg.weighted_mean([({"w": np.zeros(1)}, 0)])
