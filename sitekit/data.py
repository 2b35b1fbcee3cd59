"""A site's imaging data: how it is laid out on disk, checked, and turned into tensors.

A site folder holds NIfTI volumes the way nnU-Net and the Medical Segmentation Decathlon
lay them out, which hospital imaging teams already know::

    SITE/imagesTr/CASE.nii.gz   SITE/labelsTr/CASE.nii.gz   (training cases)
    SITE/imagesTs/CASE.nii.gz   SITE/labelsTs/CASE.nii.gz   (held-out test cases)

An image and its label share a file name. Everything here runs inside the site's own
process; only aggregate counts (:class:`SiteSummary`) are ever handed to anyone else.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

try:
    import torch
    _Dataset = torch.utils.data.Dataset
except ImportError:  # the slim sitekit-core image checks data (inspect_site) but never trains
    torch = None
    _Dataset = object

SPLITS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
SUFFIXES = (".nii.gz", ".nii")


class DataError(ValueError):
    """A site's data is unusable; the message names the site, the file and what to do."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class SiteSummary:
    """Aggregate facts about a site's data: safe to leave the site."""

    site: str
    train_cases: int
    test_cases: int
    foreground_fraction: float  # mean fraction of label > 0 voxels over training cases


def _case_id(p: Path) -> str | None:
    for suf in SUFFIXES:
        if p.name.endswith(suf):
            return p.name[: -len(suf)]
    return None


def list_cases(site: str, folder: Path, split: str) -> list[Case]:
    """The cases of one split, paired by file name; raises DataError on a missing partner."""
    img_dir, lab_dir = (folder / d for d in SPLITS[split])
    if not img_dir.is_dir():
        return []
    cases = []
    for img in sorted(img_dir.iterdir()):
        cid = _case_id(img)
        if cid is None or img.name.startswith("."):
            continue
        label = next((lab_dir / f"{cid}{s}" for s in SUFFIXES if (lab_dir / f"{cid}{s}").exists()), None)
        if label is None:
            raise DataError(
                f"site '{site}': image {img} has no label file {lab_dir / (cid + '.nii.gz')}; "
                "add the label or move the image out of the folder."
            )
        cases.append(Case(cid, img, label))
    return cases


# The largest volume a site may hand us: 2**28 voxels (1 GiB as float32; e.g. 512 x 512 x 1024). The
# header is checked before any voxel is read, so a damaged header cannot ask for terabytes.
MAX_VOXELS = 2**28


def _load(site: str, path: Path, what: str) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"site '{site}': {what} file {path} is missing; restore it or remove the case.") from None
    except Exception as exc:  # nibabel raises many types for a bad header
        raise DataError(f"site '{site}': {what} file {path} is not a readable NIfTI ({exc}); re-export it.") from None
    voxels = int(np.prod([int(d) for d in img.shape], dtype=object)) if img.shape else 0
    if voxels > MAX_VOXELS:
        raise DataError(f"site '{site}': {what} file {path} has a header claiming {' x '.join(map(str, img.shape))} voxels "
                        f"(field 'dim'), more than the {MAX_VOXELS:,} fedward reads; the header is damaged or the volume "
                        "must be cropped or resampled before export.")
    if not str(path).endswith(".gz"):  # uncompressed: the voxels must fit in the file
        need = int(img.dataobj.offset) + voxels * img.get_data_dtype().itemsize
        if need > path.stat().st_size:
            raise DataError(f"site '{site}': {what} file {path} is {path.stat().st_size:,} bytes but its header (field "
                            f"'dim') needs {need:,}: the file is truncated or its header is wrong; re-export it.")
    return img


def read_case(site: str, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32) and label (int) arrays of one case, with their consistency checked."""
    img = _load(site, case.image, "image")
    lab = _load(site, case.label, "label")
    if len(lab.shape) > 3 and any(d != 1 for d in lab.shape[3:]):
        raise DataError(f"site '{site}': label file {case.label} has shape {lab.shape}; field 'shape' must be a 3D label map "
                        "(one integer label per voxel), re-export it.")
    if img.shape[:3] != lab.shape[:3]:
        raise DataError(
            f"site '{site}': image {case.image} has shape {img.shape} but its label {case.label} has "
            f"shape {lab.shape}; field 'shape' must match, re-export the pair on the same grid."
        )
    if not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise DataError(f"site '{site}': image {case.image} and its label {case.label} have different orientation or "
                        "spacing (field 'affine'); re-export the pair on the same grid.")
    try:
        image = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"site '{site}': image file {case.image} cannot be decoded ({exc}); re-export it.") from None
    try:
        label = np.asarray(lab.dataobj).astype(np.int32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"site '{site}': label file {case.label} cannot be decoded ({exc}); re-export it.") from None
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if image.ndim != 3:
        raise DataError(f"site '{site}': image {case.image} has {image.ndim} dimensions; a 3D volume is expected.")
    if not np.isfinite(image).all():
        raise DataError(f"site '{site}': image {case.image} contains NaN or infinite voxels; re-export it.")
    return image, label


def inspect_site(site: str, folder: Path) -> SiteSummary:
    """Check every case of a site (readable, pairs consistent) and return aggregate counts.

    Raises DataError naming the site and the file on the first problem.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"site '{site}': data path {folder} is a file, not a folder; point the site's 'data' at the folder holding imagesTr/ and labelsTr/.")
    if not folder.is_dir():
        raise DataError(f"site '{site}': data folder {folder} does not exist; fix the site's 'data' path in the federation spec.")
    train = list_cases(site, folder, "train")
    test = list_cases(site, folder, "test")
    if not train:
        raise DataError(
            f"site '{site}': data folder {folder} has no training cases in {folder / 'imagesTr'}; "
            "put NIfTI images there (labels in labelsTr with the same file names)."
        )
    if not test:
        raise DataError(
            f"site '{site}': data folder {folder} has no held-out test cases in {folder / 'imagesTs'}; "
            "set some cases aside there (labels in labelsTs) so the models can be compared."
        )
    fractions = []
    for case in train + test:
        _, label = read_case(site, case)
        if case in train:
            fractions.append(float((label > 0).mean()))
    return SiteSummary(site, len(train), len(test), float(np.mean(fractions)))


# --------------------------------------------------------------------------- preprocessing

def preprocess(image: np.ndarray, label: np.ndarray, size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample to the task's input size and normalise intensities (z-score over the head).

    Returns a (1, D, H, W) float image and a (1, D, H, W) binary brain mask (label > 0).
    """
    from monai.transforms import NormalizeIntensity, Resize

    img = torch.from_numpy(np.ascontiguousarray(image))[None]
    mask = torch.from_numpy((label > 0).astype(np.float32))[None]
    img = Resize(size, mode="trilinear", anti_aliasing=False)(img)
    mask = Resize(size, mode="nearest")(mask)
    img = NormalizeIntensity(nonzero=True)(img)
    return torch.as_tensor(img, dtype=torch.float32), torch.as_tensor(mask, dtype=torch.float32)


class SiteVolumes(_Dataset):
    """The preprocessed volumes of one split of one site, held in memory (64³ is ~1 MB a case)."""

    def __init__(self, site: str, folder: Path, split: str, size: tuple[int, int, int]):
        self.site = site
        self.cases = list_cases(site, Path(folder), split)
        if not self.cases:
            raise DataError(f"site '{site}': no {split} cases in {folder}; see the README's data layout.")
        self.items = [preprocess(*read_case(site, c), tuple(size)) for c in self.cases]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
