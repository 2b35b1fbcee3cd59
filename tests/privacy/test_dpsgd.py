"""DP-SGD at a site (sitekit.privacy.dpsgd): the mechanism on real images, checked against a
per-example computation done here by hand, and the model left exactly as it was found."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sitekit.classification import ImageSet, bce_loss, build_cnn
from sitekit.privacy.dpsgd import train_round_dp


@pytest.fixture(scope="module")
def images(pneumonia_pool):
    torch.set_num_threads(1)
    return ImageSet("hospital-c", pneumonia_pool["hospital-c"], "train")


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_model_tree_and_state_dict_keys_stay_clean(images):
    model = build_cnn(seed=0)
    keys, before = list(model.state_dict()), _flat(model).clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.utils.data.Subset(images, range(64))
    for _ in range(2):  # a second round re-attaches Opacus's hooks to the same model
        res = train_round_dp(model, data, batch_size=16, optimizer=opt, loss_fn=bce_loss(), noise_multiplier=1.0,
                             max_grad_norm=1.0, steps=4)
        assert res.steps == 4
    assert list(model.state_dict()) == keys  # no "_module." prefix: the global model's keys
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())
    assert not torch.equal(_flat(model), before)
    # the hooks are gone: a plain backward pass fills .grad only
    bce_loss()(model(images.x[:3]), images.y[:3]).backward()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def _clipped_mean_by_hand(model, x, y, clip):
    total = None
    for i in range(len(x)):
        g = torch.autograd.grad(bce_loss()(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        flat = torch.cat([t.reshape(-1) for t in g])
        flat = flat * min(1.0, clip / (float(flat.norm()) + 1e-6))
        total = flat if total is None else total + flat
    return total / len(x)


def test_each_example_is_clipped_then_averaged(images):
    """Without noise, a batch holding every case (q = 1), SGD with step 1: the update is minus the
    mean of the per-example gradients each clipped to C, computed here one example at a time."""
    data = torch.utils.data.Subset(images, range(12))
    x, y = images.x[:12], images.y[:12]
    model = build_cnn(seed=1)
    clip = 0.05  # small enough that most examples are clipped
    expected = _clipped_mean_by_hand(model, x, y, clip)
    norms = []
    for i in range(12):
        g = torch.autograd.grad(bce_loss()(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        norms.append(float(torch.cat([t.reshape(-1) for t in g]).norm()))
    assert sum(n > clip for n in norms) >= 6
    before = _flat(model).clone()
    train_round_dp(model, data, batch_size=12, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                   loss_fn=bce_loss(), noise_multiplier=0.0, max_grad_norm=clip, steps=1)
    update = before - _flat(model)
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-7)
    assert float(update.norm()) <= clip + 1e-6


def test_noise_is_gaussian_with_std_sigma_c_over_batch_and_not_reproducible(images):
    """Two runs from the same model on the same (full) batch differ only by their noise:
    the difference of the updates has std √2·σ·C/B per parameter. The noise does not come from
    the federation's seed (which every participant knows): the two runs draw different noise."""
    data = torch.utils.data.Subset(images, range(16))
    sigma, clip = 2.0, 0.5
    updates = []
    for _ in range(2):
        torch.manual_seed(0)  # the public seed, the same both times
        model = build_cnn(seed=2)
        before = _flat(model).clone()
        train_round_dp(model, data, batch_size=16, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                       loss_fn=bce_loss(), noise_multiplier=sigma, max_grad_norm=clip, steps=1)
        updates.append(before - _flat(model))
    diff = (updates[0] - updates[1]).numpy()
    expected = np.sqrt(2) * sigma * clip / 16
    assert diff.std() == pytest.approx(expected, rel=0.03)
    assert abs(diff.mean()) < 5 * expected / np.sqrt(diff.size)


def test_data_independent_terms_are_added_after_the_noise(images):
    """FedProx's and SCAFFOLD's terms join the gradient after clipping and noise: with no noise
    and a constant term c, the step is minus (clipped mean + c) exactly."""
    data = torch.utils.data.Subset(images, range(8))
    model = build_cnn(seed=3)
    expected = _clipped_mean_by_hand(model, images.x[:8], images.y[:8], 0.1)
    const = [torch.full_like(p, 0.25) for p in model.parameters()]
    before = _flat(model).clone()
    train_round_dp(model, data, batch_size=8, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=bce_loss(),
                   noise_multiplier=0.0, max_grad_norm=0.1, steps=1, extra_gradient=lambda ps: const)
    torch.testing.assert_close(before - _flat(model), expected + 0.25, rtol=1e-4, atol=1e-6)


def test_empty_poisson_batches_still_take_a_counted_noise_step(images):
    """40 cases, batch 2: q = 1/20, so about one batch in eight is empty. Every requested step is
    taken and counted; an empty one moves the model by noise alone."""
    data = torch.utils.data.Subset(images, range(40))
    model = build_cnn(seed=4, channels=(4, 4, 4))
    res = train_round_dp(model, data, batch_size=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                         loss_fn=bce_loss(), noise_multiplier=1.0, max_grad_norm=1.0, steps=150)
    assert res.steps == 150
    assert 1 <= res.empty_batches < 60  # (19/20)^40 ≈ 0.13 per step: 0 empties in 150 steps has p ≈ 1e-9
    assert np.isfinite(res.loss)
