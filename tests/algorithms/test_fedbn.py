"""FedBN: normalisation layers are the site's own."""
import torch

from sitekit.algorithms import fedbn


def test_fedbn_keeps_normalisation_layers_local():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.Conv3d(2, 1, 1))
    local = fedbn.local_tensor_names(model)
    assert local == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    site = {k: torch.full_like(v, 1) for k, v in model.state_dict().items()}
    glob = {k: torch.full_like(v, 2) for k, v in model.state_dict().items()}
    merged = fedbn.merge_global(site, glob, local)
    assert all(torch.equal(merged[k], site[k]) for k in local)
    assert all(torch.equal(merged[k], glob[k]) for k in merged if k not in local)


def test_fedbn_finds_affine_instance_norm_in_the_monai_unet():
    from sitekit.model import build_model
    from sitekit.spec import ModelSpec, TaskSpec

    plain = build_model(TaskSpec(model=ModelSpec(norm="instance")))
    affine = build_model(TaskSpec(model=ModelSpec(norm="instance_affine")))
    assert fedbn.local_tensor_names(plain) == set()  # nothing to keep local: no parameters
    names = fedbn.local_tensor_names(affine)
    assert names and all(n.endswith(("weight", "bias")) for n in names)
    assert len(names) < len(affine.state_dict())  # the convolutions are still shared
