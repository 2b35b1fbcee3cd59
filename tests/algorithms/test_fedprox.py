"""FedProx's proximal term and its gradient on a 2-weight model."""
import numpy as np
import pytest
import torch

from sitekit.algorithms import fedprox


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
    with pytest.raises(ValueError):
        fedprox.ProximalTerm(model, mu=-1.0)
