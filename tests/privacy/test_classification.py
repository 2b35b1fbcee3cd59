"""The classification task kind: PneumoniaMNIST split into site folders, each site's arrays checked,
the small CNN, and AUC."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DATA
from flows.pneumonia_data import prepare_pneumonia_sites, split_indices
from sitekit.classification import ImageSet, SmallCNN, auc, build_cnn, inspect_site
from sitekit.data import DataError
from sitekit.spec import ModelSpec, TaskSpec
from sitekit.tasks import get_task

SOURCE = DATA / "medmnist" / "pneumoniamnist.npz"


def test_split_is_seeded_disjoint_and_unequal(pneumonia_pool, tmp_path):
    parts = split_indices(4708, 7, limit=900)
    assert [len(p) for p in parts] == [405, 297, 198]
    assert len(np.unique(np.concatenate(parts))) == 900
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_indices(4708, 7, limit=900)))
    assert not np.array_equal(parts[0], split_indices(4708, 8, limit=900)[0])
    manifest = json.loads((pneumonia_pool["hospital-a"].parent / "pneumonia-sites.json").read_text())
    assert [manifest["sites"][s]["train_cases"] for s in ("hospital-a", "hospital-b", "hospital-c")] == [405, 297, 198]
    # every site holds exactly its share of the real images (PneumoniaMNIST has 18 duplicated
    # images, so disjointness is checked on indices, equality on pixels)
    from flows.pneumonia_data import SPLIT_SEED

    with np.load(SOURCE) as z:
        images, labels = z["train_images"], z["train_labels"].reshape(-1)
    shares = split_indices(len(images), SPLIT_SEED, limit=900)
    for (site, folder), idx in zip(pneumonia_pool.items(), shares):
        with np.load(folder / "train.npz") as z:
            assert np.array_equal(z["images"], images[idx]) and np.array_equal(z["labels"], labels[idx])
    # a second call reuses the folders; a folder holding other data is never overwritten
    again = prepare_pneumonia_sites(SOURCE, pneumonia_pool["hospital-a"].parent, max_train=900, max_test=300)
    assert again == pneumonia_pool
    with pytest.raises(FileExistsError, match="never overwrites"):
        prepare_pneumonia_sites(SOURCE, pneumonia_pool["hospital-a"].parent, max_train=600, max_test=300)


def test_inspect_and_dataset(pneumonia_pool):
    info = inspect_site("hospital-b", pneumonia_pool["hospital-b"])
    assert info["train_cases"] == 297 and info["test_cases"] == 99 and 0.6 < info["positive_fraction"] < 0.9
    ds = ImageSet("hospital-b", pneumonia_pool["hospital-b"], "test", (28, 28))
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and -1 <= float(x.min()) <= float(x.max()) <= 1
    assert y.shape == (1,) and float(y) in (0.0, 1.0)


def _site(tmp_path, images, labels, split="train"):
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


@pytest.mark.parametrize("images, labels, words", [
    (np.zeros((4, 28, 28), np.float32), np.zeros(4, np.uint8), "field 'images' must be uint8"),
    (np.zeros((4, 28, 28, 3), np.uint8), np.zeros(4, np.uint8), "field 'images' must be uint8 [N, H, W]"),
    (np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8), "field 'labels' must hold one label per image"),
    (np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 2, 0]), "must be 0 (normal) or 1"),
])
def test_bad_site_arrays_are_one_sentence_naming_site_file_and_field(tmp_path, images, labels, words):
    folder = _site(tmp_path, images, labels)
    with pytest.raises(DataError) as err:
        ImageSet("hospital-x", folder, "train")
    msg = str(err.value)
    assert "site 'hospital-x'" in msg and str(folder / "train.npz") in msg and words in msg


def test_missing_split_and_wrong_size(tmp_path):
    folder = _site(tmp_path, np.zeros((20, 32, 32), np.uint8), np.zeros(20, np.uint8))
    with pytest.raises(DataError, match="test.npz is missing"):
        inspect_site("hospital-x", folder)
    with pytest.raises(DataError, match="task.input_size is 28x28"):
        ImageSet("hospital-x", folder, "train", (28, 28))
    (folder / "test.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        inspect_site("hospital-x", folder)


def test_cnn_has_no_batch_norm_and_is_seeded():
    m = build_cnn(seed=3)
    assert isinstance(m, SmallCNN)
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert any(isinstance(x, torch.nn.GroupNorm) for x in m.modules())
    assert m(torch.zeros(5, 1, 28, 28)).shape == (5, 1)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), build_cnn(seed=3).state_dict().values()))
    task = get_task(TaskSpec(model=ModelSpec(name="cnn2d", channels=(8, 8, 8)), kind="classification", metric="auc",
                             loss="bce", input_size=(32, 32)))
    assert task.build_model(seed=0)(torch.zeros(2, 1, 32, 32)).shape == (2, 1)


def test_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: many ties
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([3, 2, 1], [1, 1, 0]) == 1.0
    assert np.isnan(auc([1, 2], [1, 1]))


def test_task_evaluates_auc_over_the_whole_set_not_per_batch():
    task = get_task(TaskSpec(model=ModelSpec(name="cnn2d"), kind="classification", metric="auc", loss="bce"))

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(len(x), -1)[:, :1]

    # batches of 2 each holding one class: per-batch AUC is undefined, the set's AUC is 1
    x = torch.tensor([0.1, 0.2, 0.8, 0.9]).reshape(4, 1, 1, 1)
    y = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    assert task.evaluate(Fixed(), torch.utils.data.TensorDataset(x, y), batch_size=2) == 1.0
