"""A site's data: real IXI cases, and each way a hospital's folder can be broken."""
import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from sitekit.data import DataError, SiteVolumes, inspect_site, preprocess


def test_inspect_counts_real_cases(sites):
    s = inspect_site("hospital-a", sites["hospital-a"])
    assert (s.train_cases, s.test_cases) == (6, 2)
    # IXI brains fill 10-20 % of the 120x120x90 field of view
    assert 0.08 < s.foreground_fraction < 0.25


def test_preprocess_makes_binary_mask_on_task_grid(sites):
    vols = SiteVolumes("hospital-a", sites["hospital-a"], "test", (32, 32, 32))
    image, mask = vols[0]
    assert image.shape == mask.shape == (1, 32, 32, 32)
    assert set(np.unique(mask.numpy())) == {0.0, 1.0}
    brain = image[mask > 0]
    assert abs(float(brain.mean())) < 1.5  # z-scored over the head, not raw scanner units


def first(folder, sub):
    return sorted((folder / sub).iterdir())[0]


def test_missing_label(sites):
    label = first(sites["hospital-b"], "labelsTr")
    label.unlink()
    with pytest.raises(DataError) as err:
        inspect_site("hospital-b", sites["hospital-b"])
    assert "site 'hospital-b'" in str(err.value) and label.name in str(err.value) and "no label file" in str(err.value)


def test_unreadable_nifti(sites):
    img = first(sites["hospital-a"], "imagesTr")
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3])  # truncated transfer
    with pytest.raises(DataError) as err:
        inspect_site("hospital-a", sites["hospital-a"])
    assert "site 'hospital-a'" in str(err.value) and str(img) in str(err.value)


def test_not_a_nifti_at_all(sites):
    img = first(sites["hospital-a"], "imagesTs")
    img.write_bytes(gzip.compress(b"this is a PDF report, not an image"))
    with pytest.raises(DataError, match="not a readable NIfTI"):
        inspect_site("hospital-a", sites["hospital-a"])


def test_shape_mismatch(sites):
    label = first(sites["hospital-a"], "labelsTr")
    src = nib.load(str(label))
    cropped = nib.Nifti1Image(np.asarray(src.dataobj)[:, :, :80], src.affine)
    nib.save(cropped, str(label))
    with pytest.raises(DataError) as err:
        inspect_site("hospital-a", sites["hospital-a"])
    msg = str(err.value)
    assert "field 'shape'" in msg and "(120, 120, 90)" in msg and "(120, 120, 80)" in msg and label.name in msg


def test_site_with_no_cases(tmp_path):
    (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
    with pytest.raises(DataError, match=r"site 'hospital-z': data folder .* has no training cases"):
        inspect_site("hospital-z", tmp_path / "empty")


def test_site_without_test_cases(sites):
    shutil.rmtree(sites["hospital-a"] / "imagesTs")
    with pytest.raises(DataError, match="no held-out test cases"):
        inspect_site("hospital-a", sites["hospital-a"])


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        inspect_site("hospital-a", tmp_path / "nowhere")


def test_label_on_another_grid(sites):
    label = first(sites["hospital-a"], "labelsTs")
    src = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), src.affine @ np.diag([3, 3, 3, 1])), str(label))
    with pytest.raises(DataError, match="field 'affine'"):
        inspect_site("hospital-a", sites["hospital-a"])


def test_label_with_channels(sites):
    label = first(sites["hospital-a"], "labelsTr")
    src = nib.load(str(label))
    data = np.asarray(src.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), src.affine), str(label))
    with pytest.raises(DataError, match="must be a 3D label map"):
        inspect_site("hospital-a", sites["hospital-a"])


def test_data_path_is_a_file(sites):
    f = first(sites["hospital-a"], "imagesTr")
    with pytest.raises(DataError, match="is a file, not a folder"):
        inspect_site("hospital-a", f)


def test_diverging_training_stops_with_advice(sites):
    import torch

    from sitekit.model import build_loss, build_model
    from sitekit.spec import ModelSpec, TaskSpec
    from sitekit.training import make_loader, train_round

    task = TaskSpec(model=ModelSpec())
    model = build_model(task, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=float("inf"))
    data = SiteVolumes("hospital-a", sites["hospital-a"], "test", (32, 32, 32))
    with pytest.raises(FloatingPointError, match="lower 'learning_rate'"):
        train_round(model, iter(lambda: make_loader(data, 1, shuffle=False), None), opt, build_loss(task), epochs=2)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_header_claiming_a_huge_volume_is_refused_before_any_voxel_is_read(sites, suffix):
    # once: a 352-byte file whose header said 2000^3 float32 made the site allocate 32 GB
    img = first(sites["hospital-b"], "imagesTr")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.float32)
    bogus = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.eye(4), header=hdr)
    bogus.header.set_data_shape((2000, 2000, 2000))
    raw = bogus.header.binaryblock + b"\0" * 4  # the header and its extension flag, no voxels
    img.unlink()
    target = img.with_name(img.name.replace(".nii.gz", suffix))
    target.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    with pytest.raises(DataError) as err:
        inspect_site("hospital-b", sites["hospital-b"])
    msg = str(err.value)
    assert "site 'hospital-b'" in msg and str(target) in msg and "2000 x 2000 x 2000" in msg and "field 'dim'" in msg


def test_an_uncompressed_file_shorter_than_its_header_says_is_truncated(sites):
    img = first(sites["hospital-b"], "imagesTs")
    src = nib.load(str(img))
    plain = img.with_name(img.name.replace(".nii.gz", ".nii"))
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), src.affine), str(plain))
    img.unlink()
    plain.write_bytes(plain.read_bytes()[:100_000])
    with pytest.raises(DataError, match=r"is 100,000 bytes but its header \(field 'dim'\) needs"):
        inspect_site("hospital-b", sites["hospital-b"])
