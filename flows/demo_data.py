"""Turn the single-site IXI-HH collection into three simulated hospitals.

IXI-HH comes from one scanner at Hammersmith Hospital. To give a federation the feature
shift real hospitals have, the cases are split (seeded, deterministic) into three sites
and every site's images are passed through a fixed "scanner profile": a different
intensity curve, a smooth multiplicative bias field and a noise level. Labels are copied
unchanged. The result is written as the site folders a hospital would hold
(``imagesTr``/``labelsTr``/``imagesTs``/``labelsTs``), once; later calls reuse them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

SPLIT_SEED = 20240601
VERSION = 1


@dataclass(frozen=True)
class ScannerProfile:
    """A simulated scanner: out = scale * (bias * in_normalised) ** gamma + noise."""

    description: str
    gamma: float  # contrast curve applied to intensities normalised to [0, 1]
    bias: float  # peak-to-peak amplitude of the smooth multiplicative bias field
    noise: float  # Gaussian noise sigma, as a fraction of the maximum intensity
    scale: float  # overall intensity scale (arbitrary units differ between vendors)


# Fixed, deliberately different profiles (see README "The demo's hospitals").
SITES: dict[str, ScannerProfile] = {
    "hospital-a": ScannerProfile("reference: native contrast, low noise", gamma=1.0, bias=0.0, noise=0.01, scale=1.0),
    "hospital-b": ScannerProfile("strong bias field, flattened contrast", gamma=0.6, bias=0.5, noise=0.02, scale=0.5),
    "hospital-c": ScannerProfile("steep contrast curve, noisy", gamma=1.8, bias=0.2, noise=0.05, scale=4.0),
}
TRAIN_PER_SITE = 40
TEST_PER_SITE = 10


def ixi_cases(source: Path) -> list[tuple[str, Path, Path]]:
    """(case id, T1 image, DLMUSE label) for every IXI-HH scan that has both."""
    cases = []
    for img in sorted((source / "T1").glob("*_T1.nii.gz")):
        cid = img.name[: -len("_T1.nii.gz")]
        lab = source / "DLMUSE" / f"{cid}_T1_DLMUSE.nii.gz"
        if lab.exists():
            cases.append((cid, img, lab))
    return cases


def assign_sites(case_ids: list[str], seed: int = SPLIT_SEED) -> dict[str, dict[str, list[str]]]:
    """Deterministic split: {site: {"train": [...], "test": [...]}}; leftover cases are unused."""
    need = len(SITES) * (TRAIN_PER_SITE + TEST_PER_SITE)
    if len(case_ids) < need:
        raise ValueError(f"IXI-HH has {len(case_ids)} usable cases; the demo split needs {need}.")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    split, start = {}, 0
    for site in SITES:
        chunk = [str(c) for c in order[start : start + TRAIN_PER_SITE + TEST_PER_SITE]]
        split[site] = {"train": sorted(chunk[:TRAIN_PER_SITE]), "test": sorted(chunk[TRAIN_PER_SITE:])}
        start += TRAIN_PER_SITE + TEST_PER_SITE
    return split


def bias_field(shape: tuple[int, ...], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field (low-order polynomial), mean 1, peak-to-peak ~amplitude."""
    if amplitude == 0:
        return np.ones(shape, dtype=np.float32)
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    c = rng.normal(size=(len(shape), 2))
    field = sum(c[i, 0] * a + c[i, 1] * (a * a - 1 / 3) for i, a in enumerate(axes))
    field = field / (field.max() - field.min() + 1e-8)
    return (1.0 + amplitude * (field - field.mean())).astype(np.float32)


def apply_profile(image: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    top = float(np.percentile(image, 99.9)) or 1.0
    x = np.clip(image / top, 0, None)
    x = x * bias_field(image.shape, profile.bias, rng)
    x = np.power(x, profile.gamma)
    x = x + rng.normal(0, profile.noise, size=x.shape).astype(np.float32)
    return (np.clip(x, 0, None) * 1000.0 * profile.scale).astype(np.float32)


def _fingerprint(source: Path, split: dict) -> str:
    blob = json.dumps({"v": VERSION, "source": str(source.resolve()), "split": split,
                       "profiles": {k: asdict(v) for k, v in SITES.items()}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_ixi_sites(source: Path, out: Path, progress=print) -> dict[str, Path]:
    """Write (or reuse) the three demo hospital folders under ``out``; return {site: folder}."""
    source, out = Path(source), Path(out)
    cases = {cid: (img, lab) for cid, img, lab in ixi_cases(source)}
    split = assign_sites(list(cases))
    fp = _fingerprint(source, split)
    folders = {site: out / site for site in SITES}
    stamp = out / "ixi-sites.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fp and all(f.is_dir() for f in folders.values()):
        return folders
    out.mkdir(parents=True, exist_ok=True)
    for n, (site, profile) in enumerate(SITES.items()):
        progress(f"preparing {site} ({profile.description}) from IXI-HH ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{site}-", dir=out))
        rng = np.random.default_rng(SPLIT_SEED + n)
        for part, (idir, ldir) in {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}.items():
            (tmp / idir).mkdir()
            (tmp / ldir).mkdir()
            for cid in split[site][part]:
                img_path, lab_path = cases[cid]
                src = nib.load(str(img_path))
                data = apply_profile(np.asarray(src.dataobj, dtype=np.float32), profile, rng)
                dst = nib.Nifti1Image(data, src.affine)
                dst.set_data_dtype(np.int16)  # nibabel scales floats into int16 with scl_slope
                nib.save(dst, str(tmp / idir / f"{cid}.nii.gz"))
                shutil.copyfile(lab_path, tmp / ldir / f"{cid}.nii.gz")
        (tmp / "scanner-profile.json").write_text(json.dumps(asdict(profile), indent=2))
        if folders[site].exists():
            if not (folders[site] / "scanner-profile.json").exists():
                shutil.rmtree(tmp)
                raise FileExistsError(f"{folders[site]} exists and was not made by fedward; choose another --out folder.")
            shutil.rmtree(folders[site])  # our own earlier, outdated output only
        os.replace(tmp, folders[site])
    tmp_stamp = stamp.with_suffix(".tmp")
    tmp_stamp.write_text(json.dumps({"fingerprint": fp, "split": split}, indent=2))
    os.replace(tmp_stamp, stamp)
    return folders
