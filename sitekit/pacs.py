"""A site's training data from its PACS: DICOMweb in, nnU-Net-style NIfTI out, at the site.

``sitekit ingest`` (:func:`ingest`) does, for each DICOM-SEG object on the PACS:

1. **query** (QIDO-RS) the studies, and in them the segmentation series (Modality SEG);
2. **retrieve** (WADO-RS) the SEG and the one image series it references into the site's local
   cache (by default ``DATA/dicom``), one file per instance, written atomically; instances already
   in the cache are not fetched again;
3. **convert** the image series to a NIfTI volume: slices sorted along the slice normal by
   ImagePositionPatient, the spacing between slices measured from the positions (not
   SliceThickness), and the voxel-to-patient affine built from ImageOrientationPatient,
   PixelSpacing and the first slice's position, turned from DICOM's LPS into the RAS that
   nibabel and NIfTI use; pixel values through the modality LUT (RescaleSlope/Intercept);
4. **label** it from the SEG: each SEG frame goes to the image slice it was derived from
   (its SourceImageSequence reference, cross-checked against its PlanePositionSequence; the
   position alone when there is no reference). A voxel's label is the number of its segment
   (SegmentNumber); FRACTIONAL segments count from half the maximum fractional value; in a
   LABELMAP SEG the pixel value is the segment number, and values that are not segment
   numbers (padding) are background. **Overlaps**: where segments overlap, the voxel takes the
   highest segment number (the rule highdicom applies), and the overlapping voxels are
   counted in the summary; ``overlap="refuse"`` refuses such a SEG instead;
5. **write** ``imagesTr/CASE.nii.gz`` and ``labelsTr/CASE.nii.gz`` (or ``imagesTs``/``labelsTs``)
   atomically, label first, so a case exists only once both files are complete.

Case names are ``case-`` and 12 hex digits of a hash of the SEG's SOP Instance UID: no patient
identifier and no UID appears in a file name, a log line or an error message. The site keeps
the map from case back to study, series and SEG in ``CACHE/cases.json``.

Nothing the site owns is deleted or overwritten: an existing case file with the same content is
kept as it is, one with different content stops that case with a message saying so. The NIfTI
files carry no DICOM header (no names, IDs or dates), but the cached DICOM does: the site's
privacy check (:mod:`sitekit.deid`) tells whether the PACS feed was de-identified.

PACS traffic never goes through a proxy taken from the environment (the egress proxy a site sets
for the aggregator): patient images stay on the hospital network.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SPLITS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
PASSWORD_ENV = "SITEKIT_PACS_PASSWORD"


class IngestError(ValueError):
    """The PACS, a series or a segmentation cannot be used; one sentence naming site, case and what to do."""


class PacsError(IngestError):
    """The PACS itself failed (unreachable, refused the credentials, ...): the whole ingest stops."""


# --------------------------------------------------------------------------- geometry

@dataclass
class Frame:
    """One 2-D frame placed in patient space (LPS, mm)."""

    position: np.ndarray       # ImagePositionPatient: centre of the first (top-left) pixel
    orientation: np.ndarray    # ImageOrientationPatient: row direction (3), column direction (3)
    spacing: np.ndarray        # PixelSpacing: (between rows, between columns)
    key: tuple[str, int]       # (SOP Instance UID, frame number from 1): what a SEG frame refers to
    dataset: object            # the pydicom Dataset the pixels come from
    index: int                 # frame index in that dataset's pixel array


@dataclass
class Volume:
    """An image series as a 3-D array indexed [column, row, slice] with its RAS affine."""

    array: np.ndarray
    affine: np.ndarray         # voxel (i, j, k) -> RAS mm, as nibabel expects
    positions: np.ndarray      # (slices, 3) ImagePositionPatient of each slice, in array order
    orientation: np.ndarray    # (6,) the series' ImageOrientationPatient
    spacing: np.ndarray        # (2,) PixelSpacing (between rows, between columns)
    keys: dict = field(default_factory=dict)   # (SOP UID, frame) -> slice index

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _floats(value, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in _as_list(value)], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) else None


def _functional(ds, frame: int, sequence: str, keyword: str):
    """An attribute from the frame's functional groups, the shared ones, or the top level (classic images)."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame < len(per):
        seq = per[frame].get(sequence)
        if seq and keyword in seq[0]:
            return seq[0][keyword].value
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(sequence)
        if seq and keyword in seq[0]:
            return seq[0][keyword].value
    return ds[keyword].value if keyword in ds else None


def _frames(ds) -> list[Frame]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    out = []
    for f in range(n):
        pos = _floats(_functional(ds, f, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ori = _floats(_functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        spc = _floats(_functional(ds, f, "PixelMeasuresSequence", "PixelSpacing"), 2)
        out.append(Frame(pos, ori, spc, (str(ds.SOPInstanceUID), f + 1), ds, f))
    return out


def _pixels(ds) -> np.ndarray:
    arr = ds.pixel_array
    n = int(ds.get("NumberOfFrames", 1) or 1)
    return arr.reshape((n,) + arr.shape[-2:]) if arr.ndim == 2 or n == 1 else arr


def _tolerance(step: float) -> float:
    return max(0.01 * abs(step), 0.01)  # 1 % of the slice step, at least 0.01 mm


def image_volume(site: str, what: str, datasets: Iterable) -> Volume:
    """One image series (classic single-frame or enhanced multi-frame) as a :class:`Volume`.

    ``what`` names the series in messages (e.g. "the images of case case-0123abcd4567").
    Raises IngestError for a series that is not one regular 3-D grid: mixed orientations, sizes
    or pixel spacings, two slices at one position, or uneven gaps between slices.
    """
    datasets = list(datasets)
    frames = [fr for ds in datasets for fr in _frames(ds)]
    if not frames:
        raise IngestError(f"site '{site}': {what} hold no images; check the series on the PACS.")
    for ds in datasets:
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise IngestError(f"site '{site}': {what} are colour images (SamplesPerPixel > 1); "
                              "only greyscale CT/MR/PET series can become training volumes.")
    if any(fr.position is None or fr.orientation is None or fr.spacing is None for fr in frames):
        raise IngestError(f"site '{site}': {what} lack ImagePositionPatient, ImageOrientationPatient or PixelSpacing "
                          "(field 'geometry'); only series with patient geometry can become volumes.")
    first = frames[0]
    sizes = {(int(fr.dataset.Rows), int(fr.dataset.Columns)) for fr in frames}
    if len(sizes) > 1:
        raise IngestError(f"site '{site}': {what} mix image sizes {sorted(sizes)} (field 'Rows/Columns'); "
                          "split the series on the PACS so each holds one stack.")
    if any(not np.allclose(fr.orientation, first.orientation, atol=1e-4) for fr in frames):
        raise IngestError(f"site '{site}': {what} mix orientations (field 'ImageOrientationPatient', e.g. a localizer "
                          "in the series); split the series on the PACS so each holds one stack.")
    if any(not np.allclose(fr.spacing, first.spacing, rtol=1e-4, atol=1e-5) for fr in frames):
        raise IngestError(f"site '{site}': {what} mix pixel spacings (field 'PixelSpacing'); "
                          "split the series on the PACS so each holds one stack.")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    frames.sort(key=lambda fr: float(fr.position @ normal))
    positions = np.array([fr.position for fr in frames])
    depth = positions @ normal
    n = len(frames)
    if n > 1:
        gaps = np.diff(depth)
        if gaps.min() < 1e-3:
            raise IngestError(f"site '{site}': {what} have two images at the same position (field "
                              "'ImagePositionPatient'; several acquisitions or time points in one series); "
                              "split the series on the PACS so each holds one stack.")
        step = (positions[-1] - positions[0]) / (n - 1)
        expected = positions[0] + np.arange(n)[:, None] * step
        if np.abs(positions - expected).max() > _tolerance(float(np.linalg.norm(step))):
            raise IngestError(f"site '{site}': {what} have uneven gaps between slices ({gaps.min():.3g} to "
                              f"{gaps.max():.3g} mm, field 'ImagePositionPatient'); a NIfTI volume needs one "
                              "spacing: export the regular part of the series as its own series.")
    else:
        thickness = _functional(first.dataset, 0, "PixelMeasuresSequence", "SpacingBetweenSlices") or \
            _functional(first.dataset, 0, "PixelMeasuresSequence", "SliceThickness") or 1.0
        step = normal * float(thickness)
    row_spacing, col_spacing = first.spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing   # i: along a row, from one column to the next
    lps[:3, 1] = col_dir * row_spacing   # j: down a column, from one row to the next
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS

    rows, cols = sizes.pop()
    pixel_cache: dict[int, np.ndarray] = {}
    slices = []
    integral = True
    for fr in frames:
        ds = fr.dataset
        if id(ds) not in pixel_cache:
            pixel_cache[id(ds)] = _pixels(ds)
        raw = pixel_cache[id(ds)][fr.index]
        slope = float(_functional(ds, fr.index, "PixelValueTransformationSequence", "RescaleSlope") or 1.0)
        intercept = float(_functional(ds, fr.index, "PixelValueTransformationSequence", "RescaleIntercept") or 0.0)
        integral &= slope == int(slope) and intercept == int(intercept) and np.issubdtype(raw.dtype, np.integer)
        slices.append(raw.astype(np.float64) * slope + intercept)
    data = np.stack([s.T for s in slices], axis=-1)  # [column, row, slice]
    if integral and data.min() >= np.iinfo(np.int16).min and data.max() <= np.iinfo(np.int16).max:
        data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    assert data.shape == (cols, rows, n)
    keys = {fr.key: k for k, fr in enumerate(frames)}
    return Volume(data, affine, positions, first.orientation, first.spacing, keys)


# --------------------------------------------------------------------------- segmentation

@dataclass
class LabelMap:
    array: np.ndarray                      # same grid as the image; 0 = background, else segment number
    segments: dict[int, str]               # segment number -> SegmentLabel (stays at the site)
    voxels: dict[int, int]                 # segment number -> voxels labelled with it
    overlap_voxels: int                    # voxels claimed by more than one segment


def _source_key(ds, f: int) -> tuple[str, int] | None:
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None or f >= len(per):
        return None
    for der in per[f].get("DerivationImageSequence", []):
        for src in der.get("SourceImageSequence", []):
            uid = src.get("ReferencedSOPInstanceUID")
            if uid:
                frames = _as_list(src.get("ReferencedFrameNumber"))
                return str(uid), int(frames[0]) if frames else 1
    return None


def _segment_number(ds, f: int) -> int | None:
    per = ds.get("PerFrameFunctionalGroupsSequence")
    seq = per[f].get("SegmentIdentificationSequence") if per is not None and f < len(per) else None
    if not seq:
        shared = ds.get("SharedFunctionalGroupsSequence")
        seq = shared[0].get("SegmentIdentificationSequence") if shared else None
    return int(seq[0].ReferencedSegmentNumber) if seq else None


def seg_labels(site: str, case: str, seg, volume: Volume, overlap: str = "highest") -> LabelMap:
    """The label map of a DICOM-SEG on ``volume``'s grid (see the module docstring for the rules)."""
    what = f"the segmentation of case {case}"
    sop = str(seg.get("SOPClassUID", ""))
    if sop not in (SEG_STORAGE, LABELMAP_SEG_STORAGE):
        raise IngestError(f"site '{site}': {what} is not a DICOM-SEG object (field 'SOPClassUID'); "
                          "only Segmentation Storage objects become labels.")
    kind = str(seg.get("SegmentationType", "")).upper()
    if kind not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise IngestError(f"site '{site}': {what} has SegmentationType '{kind}' (field 'SegmentationType'); "
                          "expected BINARY, FRACTIONAL or LABELMAP.")
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in seg.get("SegmentSequence", [])}
    numbers = sorted(n for n in segments if n > 0)
    if not numbers:
        raise IngestError(f"site '{site}': {what} defines no segment (field 'SegmentSequence'); re-export it.")
    if max(numbers) > np.iinfo(np.uint16).max:
        raise IngestError(f"site '{site}': {what} numbers a segment above 65535 (field 'SegmentNumber').")
    rows, cols = int(seg.Rows), int(seg.Columns)
    if (cols, rows) != volume.array.shape[:2]:
        raise IngestError(f"site '{site}': {what} has frames of {rows}x{cols} pixels but its images have "
                          f"{volume.array.shape[1]}x{volume.array.shape[0]} (field 'Rows/Columns'); "
                          "resampled segmentations are not supported, export it on the image grid.")
    normal = volume.normal
    depth0 = float(volume.positions[0] @ normal)
    n_slices = volume.array.shape[2]
    step = float((volume.positions[-1] - volume.positions[0]) @ normal) / (n_slices - 1) if n_slices > 1 else None
    pixels = _pixels(seg)
    threshold = 0.5 * float(seg.get("MaximumFractionalValue", 255) or 255) if kind == "FRACTIONAL" else 0.5
    labels = np.zeros(volume.array.shape, dtype=np.uint8 if max(numbers) <= 255 else np.uint16)
    overlaps = 0
    order = []
    for fr in _frames(seg):
        f = fr.index
        if fr.orientation is not None and not np.allclose(fr.orientation, volume.orientation, atol=1e-4):
            raise IngestError(f"site '{site}': {what} frame {f + 1} is not in the plane of its images (field "
                              "'ImageOrientationPatient'); export it on the image grid.")
        if fr.spacing is not None and not np.allclose(fr.spacing, volume.spacing, rtol=1e-4, atol=1e-5):
            raise IngestError(f"site '{site}': {what} frame {f + 1} has another pixel spacing than its images "
                              "(field 'PixelSpacing'); export it on the image grid.")
        by_ref = None
        src = _source_key(seg, f)
        if src is not None:
            by_ref = volume.keys.get(src)
            if by_ref is None:
                raise IngestError(f"site '{site}': {what} frame {f + 1} refers to an image that is not in its "
                                  "series (field 'SourceImageSequence'); re-export the segmentation.")
        by_pos = None
        if fr.position is not None:
            if step is None:
                by_pos = 0
            else:
                by_pos = int(round((float(fr.position @ normal) - depth0) / step))
            if not 0 <= by_pos < n_slices or np.abs(fr.position - volume.positions[by_pos]).max() > \
                    _tolerance(step or 1.0):
                raise IngestError(f"site '{site}': {what} frame {f + 1} lies off its image grid (field "
                                  "'ImagePositionPatient'); export it on the image grid.")
        if by_ref is not None and by_pos is not None and by_ref != by_pos:
            raise IngestError(f"site '{site}': {what} frame {f + 1} refers to slice {by_ref + 1} but lies at "
                              f"slice {by_pos + 1} (fields 'SourceImageSequence', 'ImagePositionPatient'); re-export it.")
        k = by_ref if by_ref is not None else by_pos
        if k is None:
            raise IngestError(f"site '{site}': {what} frame {f + 1} names neither its source image nor its position "
                              "(fields 'SourceImageSequence', 'PlanePositionSequence'); re-export it.")
        number = _segment_number(seg, f)
        if kind != "LABELMAP" and number not in segments:
            raise IngestError(f"site '{site}': {what} frame {f + 1} belongs to no defined segment (field "
                              "'ReferencedSegmentNumber'); re-export it.")
        order.append((number or 0, f, k))
    # Ascending segment number, so that where segments overlap the highest number is written last.
    for number, f, k in sorted(order):
        frame = pixels[f].T  # [column, row], as the image
        target = labels[:, :, k]
        if kind == "LABELMAP":
            values = frame.astype(np.int64)
            known = np.isin(values, numbers)
            target[known] = values[known]
            continue
        mask = frame >= threshold if kind == "FRACTIONAL" else frame > 0
        clash = mask & (target > 0) & (target != number)
        if clash.any():
            if overlap == "refuse":
                raise IngestError(f"site '{site}': {what} has overlapping segments ({int(clash.sum())} voxels on "
                                  f"slice {k + 1}); pass --overlap highest to keep the highest segment number.")
            overlaps += int(clash.sum())
        target[mask] = np.maximum(target[mask], number)
    counts = {n: int((labels == n).sum()) for n in numbers}
    return LabelMap(labels, segments, counts, overlaps)


# --------------------------------------------------------------------------- files

def case_name(seg_instance_uid: str) -> str:
    """A case's file name: no patient identifier, no UID, stable across runs."""
    return "case-" + hashlib.sha256(seg_instance_uid.encode()).hexdigest()[:12]


def _uid_name(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _nifti(array: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)   # scanner anatomical
    img.set_qform(affine, code=1)
    return img


def _same_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> bool:
    import nibabel as nib

    try:
        old = nib.load(str(path))
        return old.shape == array.shape and np.allclose(old.affine, affine, atol=1e-4) and \
            np.array_equal(np.asarray(old.dataobj), array)
    except Exception:
        return False


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:-len('.nii.gz')]}.", suffix=".tmp.nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(_nifti(array, affine), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # only our own temporary file
        raise


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_case(site: str, data: Path, split: str, case: str, volume: Volume, labels: LabelMap) -> str:
    """Write one case's image and label; returns "written" or "present" (identical files already there)."""
    img_dir, lab_dir = (Path(data) / d for d in SPLITS[split])
    targets = [(lab_dir / f"{case}.nii.gz", labels.array), (img_dir / f"{case}.nii.gz", volume.array)]
    todo = []
    for path, array in targets:
        if path.exists():
            if not _same_nifti(path, array, volume.affine):
                raise IngestError(f"site '{site}': {path} already exists with other content; ingest never "
                                  f"overwrites a site's files: move it aside to ingest case {case} again.")
        else:
            todo.append((path, array))
    for path, array in todo:  # label first: a case counts only once its image is in place
        _write_nifti(path, array, volume.affine)
    return "written" if todo else "present"


# --------------------------------------------------------------------------- the PACS

def connect(site: str, url: str, user: str | None = None, password: str | None = None, ca_bundle: str | None = None,
            timeout: tuple[float, float] = (10.0, 300.0)):
    """A DICOMweb client for the site's PACS; ``url`` is the DICOMweb root (e.g. ``http://pacs:8042/dicom-web``).

    The password comes from the caller (the CLI reads it from ``$SITEKIT_PACS_PASSWORD``, never
    from the command line). Proxies and credentials from the environment are ignored.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.trust_env = False  # no egress proxy, no .netrc: the PACS is on the hospital network
    if user:
        session.auth = (user, password or "")
    if ca_bundle:
        session.verify = ca_bundle
    try:
        client = DICOMwebClient(url, session=session, timeout=timeout)
    except ValueError:
        raise IngestError(f"site '{site}': PACS URL '{url}' is not a URL (field 'pacs-url'); give the DICOMweb root, "
                          "e.g. https://pacs.hospital.local/dicom-web.") from None
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
    return client


def _pacs_call(site: str, url: str, what: str, fn: Callable):
    import requests

    try:
        return fn()
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        if code in (401, 403):
            hint = "check the PACS user and the password in $" + PASSWORD_ENV
        elif code == 404:
            hint = "check that the URL is the PACS's DICOMweb root (e.g. ending in /dicom-web)"
        else:
            hint = "ask the PACS administrator what the server logged"
        raise PacsError(f"site '{site}': the PACS at {url} answered HTTP {code} while {what}; {hint}.") from None
    except requests.exceptions.SSLError as exc:
        raise PacsError(f"site '{site}': the TLS handshake with the PACS at {url} failed while {what} "
                          f"({type(exc).__name__}); give the PACS's CA certificate with --pacs-ca.") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise PacsError(f"site '{site}': the PACS at {url} did not answer while {what} ({type(exc).__name__}); "
                          "check the URL and that this machine may reach the PACS.") from None


def _value(item: dict, tag: str):
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


def _paged(site: str, url: str, what: str, search: Callable, key: str, page: int = 500, max_pages: int = 2000) -> list[str]:
    """The ``key`` values of every match of a QIDO search, a page at a time, with a bound on the pages.

    (dicomweb-client's own ``get_remaining`` loops for as long as the server answers, which
    never ends on a server that ignores ``offset``.)"""
    out: list[str] = []
    for p in range(max_pages):
        batch = _pacs_call(site, url, what, lambda: search(limit=page, offset=p * page))
        values = [v for v in (_value(b, key) for b in batch) if v]
        new = [v for v in values if v not in out]
        out += new
        if len(batch) < page or not new:
            return out
    raise IngestError(f"site '{site}': the PACS at {url} returned more than {page * max_pages} results while {what}; "
                      "ingest a list of studies (--study) instead.")


@dataclass
class IngestSummary:
    """What one ingest did; counts and case names only, safe to print and to leave the site."""

    site: str
    studies: int = 0
    segmentations: int = 0
    written: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)    # case -> one-sentence reason
    voxels: dict[str, dict[int, int]] = field(default_factory=dict)   # case -> segment number -> voxels
    overlap_voxels: dict[str, int] = field(default_factory=dict)
    retrieved_instances: int = 0

    def as_dict(self) -> dict:
        return {"site": self.site, "studies": self.studies, "segmentations": self.segmentations,
                "written": self.written, "present": self.present, "skipped": self.skipped,
                "voxels": {c: {str(k): v for k, v in d.items()} for c, d in self.voxels.items()},
                "overlap_voxels": self.overlap_voxels, "retrieved_instances": self.retrieved_instances}


class _Cache:
    """The site's copy of what it fetched: CACHE/series-<hash>/<hash>.dcm, one file per instance."""

    def __init__(self, site: str, root: Path, client, url: str, summary: IngestSummary, log: Callable[[str], None]):
        self.site, self.root, self.client, self.url, self.summary, self.log = site, Path(root), client, url, summary, log

    def series(self, study: str, series: str) -> list[Path]:
        import pydicom

        folder = self.root / f"series-{_uid_name(series)}"
        wanted = set(_paged(self.site, self.url, "listing the instances of a series",
                            lambda **kw: self.client.search_for_instances(study, series, fields=["SOPInstanceUID"], **kw),
                            "00080018"))
        paths = {uid: folder / f"{_uid_name(uid)}.dcm" for uid in wanted}
        if not wanted or any(not p.exists() for p in paths.values()):
            folder.mkdir(parents=True, exist_ok=True)
            missing = sum(not p.exists() for p in paths.values())
            self.log(f"[{self.site}] retrieving {missing} of {len(wanted)} instances of a series")

            def fetch():
                for ds in self.client.iter_series(study, series):
                    uid = str(ds.SOPInstanceUID)
                    dest = paths.get(uid) or folder / f"{_uid_name(uid)}.dcm"
                    paths[uid] = dest
                    if dest.exists():
                        continue
                    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
                    try:
                        pydicom.dcmwrite(tmp, ds, enforce_file_format=False)
                        os.replace(tmp, dest)
                    finally:
                        tmp.unlink(missing_ok=True)
                    self.summary.retrieved_instances += 1

            _pacs_call(self.site, self.url, "retrieving a series", fetch)
        missing = [u for u, p in paths.items() if not p.exists()]
        if missing or not paths:
            raise IngestError(f"site '{self.site}': the PACS at {self.url} listed {len(wanted)} instances in a series "
                              f"but sent {len(paths) - len(missing)}; retry, or ask the PACS administrator.")
        return sorted(paths.values())


def ingest(site: str, url: str, data: Path, cache: Path | None = None, split: str = "train",
           studies: list[str] | None = None, overlap: str = "highest", user: str | None = None,
           password: str | None = None, ca_bundle: str | None = None, log: Callable[[str], None] = print,
           client=None) -> IngestSummary:
    """Query, retrieve, convert and label every DICOM-SEG on the PACS (or in ``studies``); see the module docstring.

    A segmentation that cannot become a case (its images are not on the PACS, its series is not
    a regular grid, ...) is skipped with its reason in the summary; the PACS not answering, or
    refusing the credentials, raises IngestError.
    """
    import pydicom

    if split not in SPLITS:
        raise IngestError(f"site '{site}': split '{split}' is not one of {sorted(SPLITS)} (field 'split').")
    if overlap not in ("highest", "refuse"):
        raise IngestError(f"site '{site}': overlap rule '{overlap}' is not 'highest' or 'refuse' (field 'overlap').")
    data = Path(data)
    cache = Path(cache) if cache else data / "dicom"
    client = client or connect(site, url, user, password, ca_bundle)
    summary = IngestSummary(site)
    store = _Cache(site, cache, client, url, summary, log)

    if studies:
        study_uids = list(dict.fromkeys(studies))
    else:
        study_uids = _paged(site, url, "searching for studies",
                            lambda **kw: client.search_for_studies(fields=["StudyInstanceUID"], **kw), "0020000D")
    summary.studies = len(study_uids)
    seg_series = []
    for study in study_uids:
        found = _paged(site, url, "searching a study for segmentations",
                       lambda **kw: client.search_for_series(study, search_filters={"Modality": "SEG"}, **kw), "0020000E")
        seg_series += [(study, u) for u in found]
    log(f"[{site}] PACS: {len(study_uids)} studies, {len(seg_series)} segmentation series")

    map_path = cache / "cases.json"
    case_map = json.loads(map_path.read_text()) if map_path.exists() else {}
    n_done = 0
    for study, series in seg_series:
        seg_files = store.series(study, series)
        for seg_file in seg_files:
            seg = pydicom.dcmread(seg_file)
            case = case_name(str(seg.SOPInstanceUID))
            summary.segmentations += 1
            n_done += 1
            try:
                refs = list(seg.get("ReferencedSeriesSequence", []))
                if len(refs) != 1:
                    raise IngestError(f"site '{site}': the segmentation of case {case} refers to {len(refs)} image series "
                                      "(field 'ReferencedSeriesSequence'); only a segmentation of one series becomes a case.")
                image_series = str(refs[0].SeriesInstanceUID)
                on_pacs = _pacs_call(site, url, "looking up a segmentation's images",
                                     lambda: client.search_for_series(study, search_filters={"SeriesInstanceUID": image_series}))
                if not on_pacs:
                    raise IngestError(f"site '{site}': the images that the segmentation of case {case} refers to are not "
                                      "on the PACS (field 'ReferencedSeriesSequence'); send them to the PACS, or ignore the case.")
                image_files = store.series(study, image_series)
                volume = image_volume(site, f"the images of case {case}", (pydicom.dcmread(p) for p in image_files))
                labels = seg_labels(site, case, seg, volume, overlap)
                status = write_case(site, data, split, case, volume, labels)
            except PacsError:
                raise
            except IngestError as exc:
                summary.skipped[case] = str(exc)
                log(f"[{site}] case {case} ({n_done}): skipped: {exc}")
                continue
            except Exception as exc:  # undecodable pixels, a missing mandatory attribute, ...
                # Only the exception's type: its text may quote a header value.
                summary.skipped[case] = (f"site '{site}': the segmentation of case {case} or its images could not be "
                                         f"converted ({type(exc).__name__}); check the objects with a DICOM validator "
                                         "(e.g. dciodvfy) and re-send them to the PACS.")
                log(f"[{site}] case {case} ({n_done}): skipped: {summary.skipped[case]}")
                continue
            (summary.written if status == "written" else summary.present).append(case)
            summary.voxels[case] = labels.voxels
            summary.overlap_voxels[case] = labels.overlap_voxels
            case_map[case] = {"study": study, "image_series": image_series, "seg_series": series,
                              "seg_instance": str(seg.SOPInstanceUID), "split": split,
                              "segments": {str(k): v for k, v in labels.segments.items()}}
            _write_json(map_path, case_map)
            shape = "x".join(str(s) for s in volume.array.shape)
            counts = ", ".join(f"{k}: {v}" for k, v in labels.voxels.items())
            extra = f"; {labels.overlap_voxels} overlapping voxels (highest segment kept)" if labels.overlap_voxels else ""
            log(f"[{site}] case {case} ({n_done}): {status} {shape} voxels, label voxels {{{counts}}}{extra}")
    log(f"[{site}] ingest: {len(summary.written)} cases written, {len(summary.present)} already present, "
        f"{len(summary.skipped)} skipped, {summary.retrieved_instances} instances retrieved")
    return summary
