"""Split PneumoniaMNIST into three simulated hospitals (the privacy benchmark's sites).

PneumoniaMNIST (MedMNIST v2: paediatric chest X-rays from Kermany et al. 2018, 28x28
greyscale, label 1 = pneumonia) comes as one collection. The split here is seeded and
deterministic: the official training images are shuffled and cut into three sites of
unequal size (45 %, 33 %, 22 %), the official test images likewise; the validation split is
not used. Unequal sizes matter for privacy: DP-SGD's sampling rate is batch / N, so the
smallest hospital spends the most ε per epoch.

Each site folder holds only that site's arrays, ``train.npz`` and ``test.npz`` (``images``
uint8 [N, 28, 28], ``labels`` uint8 [N]), written atomically. A folder that is already there
with the same split is reused; one that differs is never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

SPLIT_SEED = 20241204
SITES = ("hospital-a", "hospital-b", "hospital-c")
FRACTIONS = (0.45, 0.33, 0.22)
VERSION = 1


def split_indices(n: int, seed: int, fractions=FRACTIONS, limit: int | None = None) -> list[np.ndarray]:
    """Seeded permutation of range(n) cut into len(fractions) parts; ``limit`` caps the total used."""
    order = np.random.default_rng(seed).permutation(n)
    if limit is not None:
        order = order[:limit]
    cuts = np.floor(np.cumsum(fractions) / np.sum(fractions) * len(order)).astype(int)
    return [np.sort(part) for part in np.split(order, cuts[:-1])]


def _save(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, images=images, labels=labels)
    os.replace(tmp, path)


def prepare_pneumonia_sites(source: Path, out: Path, seed: int = SPLIT_SEED, max_train: int | None = None,
                            max_test: int | None = None, sites=SITES, fractions=FRACTIONS) -> dict[str, Path]:
    """Write one folder per site under ``out`` and ``out/pneumonia-sites.json`` describing the split.

    ``max_train`` / ``max_test`` use only that many images of each official split (smaller
    sites for tests); the rest of the split is the same function of the seed."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; point --source at pneumoniamnist.npz "
                                "(FEDWARD_DATA/medmnist/pneumoniamnist.npz)")
    with np.load(source) as z:
        data = {k: z[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    parts = {split: split_indices(len(data[f"{split}_labels"]), seed + (split == "test"), fractions,
                                  max_train if split == "train" else max_test)
             for split in ("train", "test")}
    digest = hashlib.sha256(b"".join(p.tobytes() for s in ("train", "test") for p in parts[s])).hexdigest()[:16]
    manifest = {"version": VERSION, "source": source.name, "seed": seed, "fractions": list(fractions),
                "split_digest": digest, "sites": {}}
    out.mkdir(parents=True, exist_ok=True)
    folders = {}
    for i, site in enumerate(sites):
        folder = out / site
        marker = folder / ".fedward-split"
        if marker.exists() and marker.read_text().strip() == digest:
            folders[site] = folder
        elif folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already holds other data; choose another --out (fedward never "
                                  "overwrites a site's folder)")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for split in ("train", "test"):
                idx = parts[split][i]
                _save(folder / f"{split}.npz", data[f"{split}_images"][idx],
                      data[f"{split}_labels"][idx].reshape(-1).astype(np.uint8))
            marker.write_text(digest + "\n")
            folders[site] = folder
        labels = {s: data[f"{s}_labels"][parts[s][i]].reshape(-1) for s in ("train", "test")}
        manifest["sites"][site] = {f"{s}_cases": int(len(v)) for s, v in labels.items()} | {
            f"{s}_positive_fraction": round(float(v.mean()), 4) for s, v in labels.items()}
    tmp = out / ".pneumonia-sites.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "pneumonia-sites.json")
    return folders
