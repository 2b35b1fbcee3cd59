"""A site's 2D image-classification data (e.g. PneumoniaMNIST chest X-rays), its model and metric.

A site folder holds two NumPy archives, one per split, as a hospital's export would give them::

    SITE/train.npz   images: uint8 [N, H, W] (greyscale, 0-255)   labels: integers [N] or [N, 1], 0 or 1
    SITE/test.npz    the same, the site's held-out test cases

Images are scaled to [-1, 1] with fixed constants (no statistics are shared between sites).
The model is a small CNN with group normalisation: its statistics are per image, so DP-SGD's
per-example gradients exist (Opacus cannot train through batch normalisation). The metric
is the area under the ROC curve over the site's test set.

Everything here runs inside the site's own process; only aggregate counts
(:func:`inspect_site`) are meant to leave it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sitekit.data import DataError

SPLIT_FILES = {"train": "train.npz", "test": "test.npz"}
MIN_TRAIN = 8


def _read(site: str, folder: Path, split: str, input_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    path = Path(folder) / SPLIT_FILES[split]
    if not Path(folder).is_dir():
        raise DataError(f"site '{site}': data folder {folder} does not exist; fix the site's 'data' path in the "
                        "federation spec.")
    if not path.exists():
        raise DataError(f"site '{site}': {path} is missing; put the site's {split} images and labels there "
                        "(a .npz with 'images' uint8 [N, H, W] and 'labels' 0/1 [N]).")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files or "labels" not in z.files:
                raise DataError(f"site '{site}': {path} must hold the arrays 'images' and 'labels', found "
                                f"{', '.join(z.files) or 'none'}; re-export the split with both.")
            images, labels = z["images"], z["labels"]
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # not a zip, truncated, pickled objects
        raise DataError(f"site '{site}': {path} is not a readable .npz archive ({type(exc).__name__}); "
                        "re-export it with numpy.savez.") from None
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"site '{site}': {path} field 'images' must be uint8 [N, H, W] greyscale, got "
                        f"{images.dtype} with shape {list(images.shape)}; re-export the images as 8-bit greyscale.")
    labels = labels.reshape(len(labels), -1) if labels.ndim > 1 else labels.reshape(-1, 1)
    if labels.shape != (len(images), 1):
        raise DataError(f"site '{site}': {path} field 'labels' must hold one label per image ({len(images)}), got "
                        f"shape {list(labels.shape)}; re-export the labels.")
    if not np.issubdtype(labels.dtype, np.integer) or not np.isin(labels, (0, 1)).all():
        raise DataError(f"site '{site}': {path} field 'labels' must be 0 (normal) or 1 (finding) for every image; "
                        "re-export the labels as integers 0/1.")
    if input_size is not None and tuple(images.shape[1:]) != tuple(input_size):
        raise DataError(f"site '{site}': {path} holds {images.shape[1]}x{images.shape[2]} images but the federation's "
                        f"task.input_size is {input_size[0]}x{input_size[1]}; resize the images or fix the spec.")
    return images, labels.astype(np.float32)


def inspect_site(site: str, folder: Path) -> dict:
    """Check both splits and return aggregate counts only (safe to leave the site)."""
    x_train, y_train = _read(site, folder, "train")
    x_test, y_test = _read(site, folder, "test")
    if len(x_train) < MIN_TRAIN:
        raise DataError(f"site '{site}': {Path(folder) / 'train.npz'} holds {len(x_train)} training images, fewer "
                        f"than {MIN_TRAIN}; add cases or leave this site out.")
    if len(x_test) == 0:
        raise DataError(f"site '{site}': {Path(folder) / 'test.npz'} holds no test images; hold some cases out for testing.")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"site '{site}': train.npz and test.npz hold images of different sizes "
                        f"({list(x_train.shape[1:])} and {list(x_test.shape[1:])}); export both at one size.")
    return {"train_cases": int(len(x_train)), "test_cases": int(len(x_test)),
            "positive_fraction": float(y_train.mean())}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [-1, 1] (fixed scaling, the same at every site)."""
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model input back to [0, 1] intensities (for image-quality measures)."""
    return (x + 1.0) / 2.0


class ImageSet(torch.utils.data.Dataset):
    """One split of a site: items ``(x, y)`` with x float32 [1, H, W] in [-1, 1] and y float32 [1]."""

    def __init__(self, site: str, folder: Path, split: str, input_size: tuple[int, int] | None = None):
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        images, labels = _read(site, Path(folder), split, input_size)
        self.site, self.split = site, split
        self.x = to_tensor(images)
        self.y = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


class SmallCNN(torch.nn.Module):
    """Three 3x3 convolutions (the last two with stride 2), group norm and ReLU, then two linear layers.

    Input [B, 1, H, W] with H and W multiples of 4; output one logit per image, [B, 1].
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), input_size: tuple[int, int] = (28, 28)):
        super().__init__()
        c1, c2, c3 = channels
        gn = lambda c: torch.nn.GroupNorm(min(4, c), c)  # noqa: E731
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, c1, 3, padding=1), gn(c1), torch.nn.ReLU(),
            torch.nn.Conv2d(c1, c2, 3, stride=2, padding=1), gn(c2), torch.nn.ReLU(),
            torch.nn.Conv2d(c2, c3, 3, stride=2, padding=1), gn(c3), torch.nn.ReLU(),
        )
        h, w = input_size[0] // 4, input_size[1] // 4
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c3 * h * w, c3), torch.nn.ReLU(),
                                        torch.nn.Linear(c3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_cnn(channels=(16, 32, 32), input_size=(28, 28), seed: int | None = None) -> SmallCNN:
    """A fresh :class:`SmallCNN`; with ``seed`` its initial weights are reproducible (the global RNG is untouched)."""
    if seed is None:
        return SmallCNN(tuple(channels), tuple(input_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(tuple(channels), tuple(input_size))


def bce_loss() -> torch.nn.Module:
    """Binary cross-entropy on logits, mean over the batch (a sum of per-example terms, as DP-SGD needs)."""
    return torch.nn.BCEWithLogitsLoss()


def auc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (the Mann-Whitney U statistic / (n_pos * n_neg)).

    NaN when the labels hold a single class (the AUC is undefined there).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
