"""PACS ingestion: the real DICOM of shared/data/dicom, converted directly and through a real Orthanc over DICOMweb.

Geometry is checked against the DICOM headers (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing) voxel by voxel, and labels against the DICOM-SEG frames and against the label maps
that dcmqi (an independent converter) made from the same SEG objects (the NRRD files beside them).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import DATA, free_port
from orthanc import listening_ports_in, missing_tools, orthanc_server
from sitekit.pacs import IngestError, case_name, image_volume, ingest, seg_labels

DICOM = DATA / "dicom"
SEGS = DICOM / "dcmqi" / "segmentations"
HD = DICOM / "highdicom"
BIN = Path(sys.executable).parent


def read(paths) -> list:
    return [pydicom.dcmread(p) for p in paths]


def nrrd_labels(*names: str):
    """dcmqi's label map(s) of one SEG, combined voxel-wise by the highest label, and their RAS affine."""
    import nrrd

    maps = [nrrd.read(str(SEGS / n)) for n in names]
    h = maps[0][1]
    lps = np.eye(4)
    lps[:3, :3] = np.array(h["space directions"]).T
    lps[:3, 3] = h["space origin"]
    assert h["space"] == "left-posterior-superior"
    return np.maximum.reduce([m[0] for m in maps]), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def check_geometry(array: np.ndarray, affine: np.ndarray, files: list[Path]) -> None:
    """Every slice of ``files`` is where the affine says, with its pixels (modality LUT applied) at those voxels."""
    inv = np.linalg.inv(affine)
    for f in files:
        ds = pydicom.dcmread(f)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ps = [float(v) for v in ds.PixelSpacing]
        pix = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        for r, c in [(0, 0), (ds.Rows - 1, 0), (0, ds.Columns - 1), (ds.Rows // 2, ds.Columns // 3)]:
            lps = ipp + c * ps[1] * iop[:3] + r * ps[0] * iop[3:]            # PS3.3 C.7.6.2.1.1
            ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
            i, j, k = np.round(inv @ ras)[:3].astype(int)
            assert np.allclose(inv @ ras, [i, j, k, 1], atol=1e-3)
            assert (i, j) == (c, r)
            assert array[i, j, k] == pix[r, c]


# --------------------------------------------------------------------------- conversion, no PACS

def test_ct_series_geometry_and_liver_seg_match_dicom_and_dcmqi():
    files = sorted((SEGS / "ct-3slice").glob("*.dcm"))
    random.Random(0).shuffle(files)  # order on disk or from the PACS must not matter
    vol = image_volume("hospital-a", "the CT", read(files))
    assert vol.array.shape == (512, 512, 3) and vol.array.dtype == np.int16
    # Slices go up in z from 03.dcm (z = -128.69) to 01.dcm (z = -126.69): 1.0 mm apart, though
    # SliceThickness says 1.25; pixels 0.810547 mm; LPS x, y flip sign in RAS.
    assert np.allclose(vol.affine, [[-0.810547, 0, 0, 235.199997], [0, -0.810547, 0, 226.800003],
                                    [0, 0, 1.0, -128.690002], [0, 0, 0, 1]], atol=1e-6)
    check_geometry(vol.array, vol.affine, files)
    assert vol.array.min() == -3024 and vol.array.max() == 1381   # HU after RescaleIntercept -1024
    lab = seg_labels("hospital-a", "c", pydicom.dcmread(SEGS / "liver.dcm"), vol)
    ref, ref_affine = nrrd_labels("liver_seg.nrrd")
    assert np.allclose(ref_affine, vol.affine, atol=1e-4)
    assert np.array_equal(lab.array, ref)
    assert lab.voxels == {1: 107098} and lab.overlap_voxels == 0
    assert [int(lab.array[..., k].sum()) for k in range(3)] == [36233, 35645, 35220]  # the SEG's frames 1-3


def test_overlapping_segments_take_the_highest_number():
    vol = image_volume("hospital-a", "the CT", read(sorted((SEGS / "ct-3slice").glob("*.dcm"))))
    seg = pydicom.dcmread(SEGS / "partial_overlaps.dcm")
    lab = seg_labels("hospital-a", "c", seg, vol)
    # dcmqi splits this SEG into three non-overlapping label maps; the highest label per voxel is our rule.
    ref, _ = nrrd_labels("partial_overlaps-1.nrrd", "partial_overlaps-2.nrrd", "partial_overlaps-3.nrrd")
    assert np.array_equal(lab.array, ref)
    assert lab.segments == {1: "GREEN", 2: "ORANGE", 3: "PURPLE", 4: "LIGHT_BLUE", 5: "DARK_BLUE"}
    # Segments 4 and 5 never lose a voxel; 1, 2, 3 lose what a higher segment also claims.
    frame_counts: dict[int, int] = {}
    for fg, px in zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array):
        n = fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        frame_counts[n] = frame_counts.get(n, 0) + int(px.sum())
    assert frame_counts == {1: 9602, 2: 11888, 3: 10743, 4: 6693, 5: 4713}
    assert lab.voxels == {1: 6518, 2: 11838, 3: 10743, 4: 6693, 5: 4713}
    assert lab.overlap_voxels == sum(frame_counts.values()) - sum(lab.voxels.values()) == 3134
    with pytest.raises(IngestError, match=r"site 'hospital-a': the segmentation of case c has overlapping segments"):
        seg_labels("hospital-a", "c", seg, vol, overlap="refuse")


@pytest.mark.parametrize("grid", ["23x38x3", "24x38x3"])
def test_small_series_multiframe_and_seg_match_dcmqi(grid):
    files = sorted((SEGS / grid / "image").glob("*.dcm"))
    vol = image_volume("hospital-a", "x", read(files))
    check_geometry(vol.array, vol.affine, files)
    # The same images as one legacy-converted enhanced multi-frame object: same volume, same affine.
    mf = image_volume("hospital-a", "x", read([SEGS / grid / "multiframe" / "mf.dcm"]))
    assert np.array_equal(mf.array, vol.array) and np.allclose(mf.affine, vol.affine)
    lab = seg_labels("hospital-a", "c", pydicom.dcmread(SEGS / grid / "seg" / "label.seg"), vol)
    ref, ref_affine = nrrd_labels(f"{grid}/nrrd/label.nrrd")
    assert np.array_equal(lab.array, ref) and np.allclose(ref_affine, vol.affine, atol=1e-4)
    assert lab.voxels == {1: 322 if grid == "23x38x3" else 315}
    # A SEG derived from the multi-frame object refers to (SOP Instance UID, frame number): point the
    # frames at mf.dcm's frames in reverse (frame 3 first) and move their positions to match.
    seg = pydicom.dcmread(SEGS / grid / "seg" / "label.seg")
    mf_ds = pydicom.dcmread(SEGS / grid / "multiframe" / "mf.dcm")
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = fg.DerivationImageSequence[0].SourceImageSequence[0]
        src.ReferencedSOPInstanceUID = mf_ds.SOPInstanceUID
        src.ReferencedFrameNumber = 3 - f
        fg.PlanePositionSequence[0].ImagePositionPatient = \
            mf_ds.PerFrameFunctionalGroupsSequence[2 - f].PlanePositionSequence[0].ImagePositionPatient
    flipped = seg_labels("hospital-a", "c", seg, mf)
    assert np.array_equal(flipped.array, lab.array[..., ::-1])


def test_sparse_labelmap_seg_padding_is_background():
    vol = image_volume("hospital-a", "x", read(sorted((SEGS / "24x38x3" / "image").glob("*.dcm"))))
    ref, _ = nrrd_labels("sparse_labelmap_noppv_seg.nrrd")
    padded, _ = nrrd_labels("sparse_labelmap_ppv5_seg.nrrd")
    assert int((padded == 5).sum()) == 24 * 38   # dcmqi fills the frame-less middle slice with the padding value 5
    for name in ("sparse-labelmap-noppv.dcm", "sparse-labelmap-ppv5.dcm"):
        seg = pydicom.dcmread(SEGS / name)
        assert seg.SegmentationType == "LABELMAP" and seg.NumberOfFrames == 2
        lab = seg_labels("hospital-a", "c", seg, vol)
        assert np.array_equal(lab.array, ref)     # 5 is no segment: background, not label 5
        assert lab.voxels == {1: 630}
    # Padding inside a frame (the ppv5 object declares PixelPaddingValue 5): background too.
    seg = pydicom.dcmread(SEGS / "sparse-labelmap-ppv5.dcm")
    px = seg.pixel_array.copy()
    assert seg.PixelPaddingValue == 5 and int(px[0, :4].sum()) > 0   # rows 0-3 of frame 1 hold liver (1) pixels
    px[0, :4] = 5
    seg.PixelData = px.tobytes()
    lab = seg_labels("hospital-a", "c", seg, vol)
    expected = ref.copy()
    expected[:, :4, 0] = 0                      # frame 1 is slice 1; rows are the second axis
    assert np.array_equal(lab.array, expected) and 5 not in lab.array


def test_uneven_series_is_refused_and_fractional_segs_threshold_at_half():
    files = sorted((HD / "pydicom_77654033_CT2").iterdir())
    with pytest.raises(IngestError, match=r"site 'hospital-a': the images of case x have uneven gaps between slices "
                                          r"\(1\.25 to 202 mm, field 'ImagePositionPatient'\)"):
        image_volume("hospital-a", "the images of case x", read(files))
    vol = image_volume("hospital-a", "x", read(files[1:]))  # the three regular slices the SEGs below cover
    binary = seg_labels("hospital-a", "c", pydicom.dcmread(HD / "seg_image_ct_binary.dcm"), vol)
    assert binary.voxels == {1: 127 + 256 + 255}
    stored_fractional = seg_labels("hospital-a", "c", pydicom.dcmread(HD / "seg_image_ct_binary_fractional.dcm"), vol)
    assert np.array_equal(stored_fractional.array, binary.array)
    true_frac = pydicom.dcmread(HD / "seg_image_ct_true_fractional.dcm")
    lab = seg_labels("hospital-a", "c", true_frac, vol)
    assert set(np.unique(true_frac.pixel_array)) == {0, 64, 128} and true_frac.MaximumFractionalValue == 255
    assert lab.voxels[1] == int((true_frac.pixel_array >= 128).sum()) < int((true_frac.pixel_array > 0).sum())


def test_single_slice_and_an_oblique_reordered_copy(tmp_path):
    one = image_volume("hospital-a", "x", read([HD / "ct_image.dcm"]))
    assert one.array.shape == (128, 128, 1) and one.affine[2, 2] == 5.0   # SliceThickness for the only slice
    check_geometry(one.array, one.affine, [HD / "ct_image.dcm"])
    lab = seg_labels("hospital-a", "c", pydicom.dcmread(HD / "seg_image_ct_binary_single_frame.dcm"), one)
    assert lab.voxels == {1: int(pydicom.dcmread(HD / "seg_image_ct_binary_single_frame.dcm").pixel_array.sum())} == {1: 1832}

    # Re-place the 23x38x3 images on a sagittal, tilted grid (rows along y, columns along -z, slices
    # along -x, stacked off-axis) and shuffle them: voxel positions must still follow the headers.
    row = np.array([0.0, np.cos(0.3), np.sin(0.3)])
    col = np.array([0.0, np.sin(0.3), -np.cos(0.3)])
    normal = np.cross(row, col)
    out = []
    for k, f in enumerate(sorted((SEGS / "23x38x3" / "image").glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (np.array([10.0, -20.0, 30.0]) + 2.5 * k * normal)]
        ds.PixelSpacing = ["0.9", "0.6"]
        ds.save_as(tmp_path / f"{k}.dcm")
        out.append(tmp_path / f"{k}.dcm")
    vol = image_volume("hospital-a", "x", read(out[::-1]))
    check_geometry(vol.array, vol.affine, out)
    assert np.allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), [0.6, 0.9, 2.5])


def test_broken_grids_are_refused_with_one_sentence(tmp_path):
    files = sorted((SEGS / "23x38x3" / "image").glob("*.dcm"))
    dup = read(files)
    dup[2].ImagePositionPatient = dup[1].ImagePositionPatient
    with pytest.raises(IngestError, match=r"have two images at the same position"):
        image_volume("hospital-a", "the images of case x", dup)
    tilted = read(files)
    tilted[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(IngestError, match=r"mix orientations \(field 'ImageOrientationPatient'"):
        image_volume("hospital-a", "the images of case x", tilted)
    vol = image_volume("hospital-a", "x", read(files))
    seg = pydicom.dcmread(SEGS / "23x38x3" / "seg" / "label.seg")
    seg.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient = \
        seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    with pytest.raises(IngestError, match=r"frame 2 refers to slice 2 but lies at slice 1"):
        seg_labels("hospital-a", "c", seg, vol)
    other = image_volume("hospital-a", "x", read(sorted((SEGS / "24x38x3" / "image").glob("*.dcm"))))
    with pytest.raises(IngestError, match=r"has frames of 38x23 pixels but its images have 38x24"):
        seg_labels("hospital-a", "c", pydicom.dcmread(SEGS / "23x38x3" / "seg" / "label.seg"), other)


# --------------------------------------------------------------------------- through a real Orthanc

SOURCES = sorted(p for p in DICOM.rglob("*") if p.is_file() and p.suffix != ".nrrd")


def _uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A real Orthanc, private to this module, loaded with every DICOM file of shared/data/dicom over REST."""
    if missing_tools():
        pytest.fail(missing_tools())
    if not DICOM.is_dir():
        pytest.fail(f"DICOM data not found at {DICOM}; set FEDWARD_DATA to the shared data folder")
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        new = server.upload(SOURCES)
        assert len(SOURCES) == 30 and new == 29    # the two sparse label-map SEGs share one SOP Instance UID
        yield server


@pytest.fixture(scope="module")
def ingested(pacs, tmp_path_factory):
    """One ``sitekit ingest`` run (the real CLI) against the PACS, with a dead proxy in its environment."""
    data = tmp_path_factory.mktemp("hospital-a")
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "SITEKIT_PACS_PASSWORD": pacs.password, "http_proxy": dead, "https_proxy": dead,
           "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead}
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    r = subprocess.run([str(BIN / "sitekit"), "ingest", "--site", "hospital-a", "--data", str(data),
                        "--pacs-url", pacs.dicomweb, "--pacs-user", pacs.user],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    return data, r.stdout + r.stderr, summary


def test_orthanc_runs_alone_in_its_network_namespace(pacs):
    ours = os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{pacs.pid}/ns/net") != ours
    assert 8042 in listening_ports_in(pacs.pid)
    links = subprocess.run(["ip", "-n", pacs.netns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]


def test_ingest_writes_one_case_per_usable_seg(ingested):
    data, _, summary = ingested
    usable = {"23x38x3/seg/label.seg", "24x38x3/seg/label.seg", "liver.dcm", "partial_overlaps.dcm",
              "sparse-labelmap-noppv.dcm"}
    expected = {case_name(_uid_of(SEGS / n)) for n in usable} | {case_name(_uid_of(HD / "seg_image_ct_binary_single_frame.dcm"))}
    assert set(summary["written"]) == expected and summary["present"] == []
    assert summary["studies"] == 6 and summary["segmentations"] == 11
    skipped = summary["skipped"]
    assert skipped[case_name(_uid_of(DICOM / "dcmqi/sr-example/seg.dcm"))].endswith(
        "are not on the PACS (field 'ReferencedSeriesSequence'); send them to the PACS, or ignore the case.")
    for n in ("binary", "binary_fractional", "true_fractional", "binary_overlap"):
        assert "uneven gaps between slices" in skipped[case_name(_uid_of(HD / f"seg_image_ct_{n}.dcm"))]
    assert len(skipped) == 5
    assert sorted(p.name for p in (data / "imagesTr").iterdir()) == sorted(f"{c}.nii.gz" for c in expected)
    assert sorted(p.name for p in (data / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in expected)
    # Only what the SEGs need: the 11 SEGs and the 14 images of the 5 series they refer to (3 + 3 + 3 + 4 + 1),
    # not the two multi-frame images nor the SR and RWV objects, which no SEG refers to.
    assert summary["retrieved_instances"] == 11 + 14


def test_ingested_cases_match_dicom_geometry_and_dcmqi_labels(ingested):
    from sitekit.data import list_cases, read_case

    data, _, summary = ingested
    series = {
        "liver.dcm": (sorted((SEGS / "ct-3slice").glob("*.dcm")), ["liver_seg.nrrd"]),
        "partial_overlaps.dcm": (sorted((SEGS / "ct-3slice").glob("*.dcm")),
                                 ["partial_overlaps-1.nrrd", "partial_overlaps-2.nrrd", "partial_overlaps-3.nrrd"]),
        "23x38x3/seg/label.seg": (sorted((SEGS / "23x38x3/image").glob("*.dcm")), ["23x38x3/nrrd/label.nrrd"]),
        "24x38x3/seg/label.seg": (sorted((SEGS / "24x38x3/image").glob("*.dcm")), ["24x38x3/nrrd/label.nrrd"]),
        "sparse-labelmap-noppv.dcm": (sorted((SEGS / "24x38x3/image").glob("*.dcm")), ["sparse_labelmap_noppv_seg.nrrd"]),
    }
    cases = {c.case_id: c for c in list_cases("hospital-a", data, "train")}
    for seg_file, (images, nrrds) in series.items():
        case = case_name(_uid_of(SEGS / seg_file))
        image, label = read_case("hospital-a", cases[case])      # what training reads
        img = nib.load(cases[case].image)
        first = pydicom.dcmread(images[0], stop_before_pixels=True)
        assert image.shape == (first.Columns, first.Rows, len(images))
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        check_geometry(np.asarray(img.dataobj), img.affine, images)
        ref, ref_affine = nrrd_labels(*nrrds)
        assert np.allclose(img.affine, ref_affine, atol=1e-4)
        assert np.array_equal(label, ref), seg_file
        counts = {int(v): int(n) for v, n in zip(*np.unique(label, return_counts=True)) if v}
        assert summary["voxels"][case] == {str(k): v for k, v in counts.items()}
    liver = case_name(_uid_of(SEGS / "liver.dcm"))
    assert summary["voxels"][liver] == {"1": 107098}
    assert summary["overlap_voxels"][case_name(_uid_of(SEGS / "partial_overlaps.dcm"))] == 3134
    single = case_name(_uid_of(HD / "seg_image_ct_binary_single_frame.dcm"))
    img = nib.load(data / "imagesTr" / f"{single}.nii.gz")
    assert img.shape == (128, 128, 1)
    check_geometry(np.asarray(img.dataobj), img.affine, [HD / "ct_image.dcm"])
    assert summary["voxels"][single] == {"1": 1832}


def test_ingest_names_no_patient_identifier_or_uid(ingested):
    data, output, _ = ingested
    secrets_ = set()
    for p in SOURCES:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for kw in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                   "SOPInstanceUID"):
            v = str(ds.get(kw, "") or "")
            if len(v) >= 4:
                secrets_.add(v)
    assert {"JANCT000", "99000", "03086212", "CompressedSamples^CT1"} <= secrets_
    names = [str(p.relative_to(data)) for p in data.rglob("*")]
    for s in secrets_:
        assert s not in output
        assert not any(s in n for n in names)
    # The NIfTI header carries no DICOM text either.
    for p in (data / "imagesTr").iterdir():
        h = nib.load(p).header
        assert not any(s.encode() in bytes(h["descrip"]) + bytes(h["aux_file"]) for s in secrets_)
    # The cached DICOM is the PACS's own data: identified here, and the privacy scan says so by file and tag.
    from sitekit.deid import scan_dicom_folder

    found = scan_dicom_folder("hospital-a", data)
    assert {f.tag for f in found} == {"PatientName", "PatientID", "AccessionNumber", "PatientBirthDate",
                                      "PatientBirthTime", "InstitutionName"}
    assert all(f.file.startswith("dicom/series-") for f in found)
    assert (data / "dicom" / "cases.json").is_file()


def test_rerun_fetches_nothing_and_never_overwrites(pacs, ingested, tmp_path):
    data = Path(shutil.copytree(ingested[0], tmp_path / "hospital-a"))
    lines: list[str] = []
    again = ingest("hospital-a", pacs.dicomweb, data, user=pacs.user, password=pacs.password, log=lines.append)
    assert again.retrieved_instances == 0 and again.written == []
    assert set(again.present) == set(ingested[2]["written"])
    liver = case_name(_uid_of(SEGS / "liver.dcm"))
    target = data / "labelsTr" / f"{liver}.nii.gz"
    img = nib.load(target)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), target)   # a site's own edit
    before = target.read_bytes()
    third = ingest("hospital-a", pacs.dicomweb, data, user=pacs.user, password=pacs.password, log=lines.append)
    assert target.read_bytes() == before
    assert third.skipped[liver] == (f"site 'hospital-a': {target} already exists with other content; ingest never "
                                    f"overwrites a site's files: move it aside to ingest case {liver} again.")
    assert liver not in third.present and len(third.present) == 5
    assert not list(data.rglob(".*tmp*"))   # no temporary file left behind


def test_study_filter_test_split_and_refusing_overlaps(pacs, tmp_path):
    study = str(pydicom.dcmread(SEGS / "liver.dcm", stop_before_pixels=True).StudyInstanceUID)
    out = ingest("hospital-b", pacs.dicomweb, tmp_path / "b", split="test", studies=[study], overlap="refuse",
                 user=pacs.user, password=pacs.password, log=lambda line: None)
    liver, overlaps = case_name(_uid_of(SEGS / "liver.dcm")), case_name(_uid_of(SEGS / "partial_overlaps.dcm"))
    assert out.studies == 1 and out.written == [liver]
    assert "has overlapping segments" in out.skipped[overlaps] and len(out.skipped) == 1
    assert [p.name for p in (tmp_path / "b" / "imagesTs").iterdir()] == [f"{liver}.nii.gz"]
    assert not (tmp_path / "b" / "imagesTr").exists()


def test_wrong_password_and_unreachable_pacs_fail_with_one_sentence(pacs, tmp_path):
    env = {**os.environ, "SITEKIT_PACS_PASSWORD": "not-the-password"}
    r = subprocess.run([str(BIN / "sitekit"), "ingest", "--site", "hospital-a", "--data", str(tmp_path / "a"),
                        "--pacs-url", pacs.dicomweb, "--pacs-user", pacs.user],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert r.stderr.strip() == (f"sitekit: site 'hospital-a': the PACS at {pacs.dicomweb} answered HTTP 401 while "
                                "searching for studies; check the PACS user and the password in $SITEKIT_PACS_PASSWORD.")
    assert "not-the-password" not in r.stdout + r.stderr
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(IngestError, match=rf"site 'hospital-a': the PACS at {url} did not answer while searching "
                                          r"for studies \(ConnectionError\); check the URL"):
        ingest("hospital-a", url, tmp_path / "a", log=lambda line: None)
    with pytest.raises(IngestError, match=r"answered HTTP 404 .* DICOMweb root"):
        ingest("hospital-a", pacs.url + "/no-dicom-web", tmp_path / "a", user=pacs.user, password=pacs.password,
               log=lambda line: None)
    assert not (tmp_path / "a" / "imagesTr").exists()


def test_a_case_that_cannot_be_decoded_is_skipped_without_quoting_the_header(pacs, tmp_path):
    """A new study on the PACS: the 23x38x3 images and their SEG under new UIDs, one image's pixels cut in half."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    study, series, seg_series = generate_uid(), generate_uid(), generate_uid()
    uids = {}
    files = []
    for k, f in enumerate(sorted((SEGS / "23x38x3" / "image").glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        uids[ds.SOPInstanceUID] = ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        if k == 1:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        files.append(tmp_path / f"img{k}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    seg = pydicom.dcmread(SEGS / "23x38x3" / "seg" / "label.seg")
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.StudyInstanceUID, seg.SeriesInstanceUID = study, seg_series
    ref = seg.ReferencedSeriesSequence[0]
    ref.SeriesInstanceUID = series
    for item in ref.ReferencedInstanceSequence:
        item.ReferencedSOPInstanceUID = uids[item.ReferencedSOPInstanceUID]
    for fg in seg.PerFrameFunctionalGroupsSequence:
        src = fg.DerivationImageSequence[0].SourceImageSequence[0]
        src.ReferencedSOPInstanceUID = uids[src.ReferencedSOPInstanceUID]
    files.append(tmp_path / "seg.dcm")
    seg.save_as(files[-1])
    assert pacs.upload(files) == 4
    lines: list[str] = []
    try:
        out = ingest("hospital-a", pacs.dicomweb, tmp_path / "a", studies=[study], user=pacs.user,
                     password=pacs.password, log=lines.append)
    finally:  # leave the module's PACS as the other tests expect it, whatever the order they run in
        (found,) = pacs.request("/tools/lookup", study.encode(), "POST")
        pacs.request(f"/studies/{found['ID']}", method="DELETE")
    assert pacs.request("/statistics")["CountStudies"] == 6
    case = case_name(str(seg.SOPInstanceUID))
    assert out.written == [] and list(out.skipped) == [case]
    assert out.skipped[case] == (f"site 'hospital-a': the segmentation of case {case} or its images could not be "
                                 "converted (ValueError); check the objects with a DICOM validator (e.g. dciodvfy) "
                                 "and re-send them to the PACS.")
    assert not (tmp_path / "a" / "imagesTr").exists() and not (tmp_path / "a" / "labelsTr").exists()
    assert study not in "\n".join(lines) and "123456" not in "\n".join(lines)
