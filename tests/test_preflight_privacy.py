"""The privacy part of `sitekit preflight`: DICOM headers are scanned with sitekit.deid; data that is not de-identified is refused, naming the tag and the file."""
import shutil
import sys
import types
from pathlib import Path

import pytest

from conftest import DATA
from sitekit import preflight as P
from sitekit.sitehome import SiteSettings

CT = DATA / "dicom" / "dcmqi" / "segmentations" / "ct-3slice"


def _dicom_copy(tmp_path) -> Path:
    if not CT.is_dir():
        pytest.fail(f"DICOM test data not found at {CT}; set FEDWARD_DATA to the shared data folder")
    return Path(shutil.copytree(CT, tmp_path / "dicom"))


def test_no_dicom_nothing_to_scan(ixi_pool):
    c = P.check_privacy(SiteSettings("hospital-a", ixi_pool["hospital-a"]))
    assert c.status == P.PASS and "no DICOM files" in c.lines[0]


def test_dicom_found_by_content_not_only_by_name(tmp_path):
    folder = _dicom_copy(tmp_path)
    for p in folder.iterdir():
        p.rename(p.with_suffix(""))  # PACS exports often have no suffix: the DICM magic still tells
    assert P._has_dicom(folder)
    assert not P._has_dicom(DATA / "heart-disease")


def test_without_the_scanner_dicom_is_refused_not_passed(tmp_path, ixi_pool, monkeypatch):
    monkeypatch.setitem(sys.modules, "sitekit.deid", None)  # an install without the scanner: import fails
    c = P.check_privacy(SiteSettings("hospital-a", ixi_pool["hospital-a"], dicom=_dicom_copy(tmp_path)))
    assert c.status == P.FAIL
    assert "no DICOM de-identification scanner (sitekit.deid is missing)" in c.lines[0]


def test_findings_are_reported_by_file_and_tag(tmp_path, ixi_pool, monkeypatch):
    """STAND-IN for sitekit.deid (named as such): checks how preflight reports findings, not the scan."""
    from dataclasses import dataclass

    @dataclass
    class Finding:
        site: str
        file: str
        tag: str
        kind: str

        def describe(self):
            return f"site '{self.site}': file {self.file} has {self.tag} ({self.kind}) set"

    calls = []

    def scan_dicom_folder(site, folder):
        calls.append((site, Path(folder)))
        return [Finding(site, "02.dcm", "PatientName", "a patient name"), Finding(site, "03.dcm", "PatientBirthDate", "a birth date")]

    stand_in = types.ModuleType("sitekit.deid")
    stand_in.scan_dicom_folder = scan_dicom_folder
    monkeypatch.setitem(sys.modules, "sitekit.deid", stand_in)
    folder = _dicom_copy(tmp_path)
    c = P.check_privacy(SiteSettings("hospital-a", ixi_pool["hospital-a"], dicom=folder))
    assert calls == [("hospital-a", folder)]
    assert c.status == P.FAIL and c.figures == {"findings": 2}
    text = "\n".join(c.lines)
    assert "2 identifier(s) in 2 file(s)" in text and "02.dcm has PatientName (a patient name)" in text
    assert "03.dcm has PatientBirthDate" in text
    # DICOM inside the data folder itself is scanned too (no 'dicom' setting needed)
    calls.clear()
    data = Path(shutil.copytree(ixi_pool["hospital-a"], tmp_path / "data"))
    shutil.copyfile(folder / "01.dcm", data / "imagesTr" / "scan.dcm")
    P.check_privacy(SiteSettings("hospital-a", data))
    assert calls == [("hospital-a", data)]


def test_real_scanner_refuses_a_patient_name(tmp_path, ixi_pool):
    import pydicom

    folder = _dicom_copy(tmp_path)
    ds = pydicom.dcmread(folder / "02.dcm")
    ds.PatientName = "Doe^Jane"
    ds.save_as(folder / "02.dcm")
    c = P.check_privacy(SiteSettings("hospital-a", ixi_pool["hospital-a"], dicom=folder))
    assert c.status == P.FAIL
    assert any("02.dcm" in line and "PatientName" in line for line in c.lines)
    assert "Doe" not in "\n".join(c.lines)  # the value never appears in the report
