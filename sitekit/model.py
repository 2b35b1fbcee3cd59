"""The task's network, loss and metric, built from the federation spec's ``task`` section."""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import UNet

from sitekit.spec import TaskSpec


def build_model(task: TaskSpec, seed: int | None = None) -> torch.nn.Module:
    """A MONAI 3D UNet: 1 input channel (T1), 2 output channels (background, brain)."""
    if seed is not None:
        torch.manual_seed(seed)
    m = task.model
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=tuple(m.channels),
        strides=tuple(m.strides),
        num_res_units=m.res_units,
        # instance: per-volume statistics, no parameters, no running stats to disagree between scanners;
        # instance_affine / batch give the normalisation layers parameters (FedBN keeps those at each site).
        norm={"instance": "instance", "instance_affine": ("instance", {"affine": True}), "batch": "batch"}[m.norm],
    )


def build_loss(task: TaskSpec) -> torch.nn.Module:
    if task.loss == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def dice_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-case Dice of the predicted foreground (argmax) against a binary target, shape (B,)."""
    pred = logits.argmax(dim=1).float()
    tgt = target[:, 0].float()
    dims = tuple(range(1, pred.ndim))
    inter = (pred * tgt).sum(dims)
    denom = pred.sum(dims) + tgt.sum(dims)
    # Both empty = perfect agreement; avoids 0/0.
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-8), torch.ones_like(denom))
