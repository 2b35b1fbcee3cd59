"""FedBN — Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021.

Normalisation layers stay at each site: their parameters and running statistics are
neither sent nor overwritten; every other tensor follows FedAvg.

    w_{t+1}[θ] = FedAvg over sites of w_k[θ]    for θ not in a normalisation layer
    w_k[θ]     = site k's own value             for θ in a normalisation layer

The model evaluated at a site therefore uses that site's own normalisation layers.
"""
from __future__ import annotations

import torch

NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def local_tensor_names(model: torch.nn.Module) -> set[str]:
    """State-dict names (parameters and buffers) that belong to normalisation layers."""
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
            names.update(prefix + n for n, _ in module.named_buffers(recurse=False))
    return names


def merge_global(site_state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor],
                 local_names: set[str]) -> dict[str, torch.Tensor]:
    """The site's model for the next round: global tensors, except its own normalisation layers."""
    return {k: (site_state[k] if k in local_names else global_state[k]) for k in global_state}
