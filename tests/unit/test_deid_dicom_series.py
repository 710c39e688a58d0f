"""DICOM WSI series (bundles): LABEL / OVERVIEW / localizer instances dropped, UIDs remapped
consistently across all instances (references inside sequences included), de-identification
marks on every instance, frames unchanged, OpenSlide opens the result as a series; on a
generated series with planted values and on the real samples boxes (2 instances) and BPAEC
(10 instances: 8 levels, a LABEL and a REGIONLOCALIZER map)."""

from __future__ import annotations

import contextlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest

from services.deid.engine import DeidRejected, deidentify_and_verify
from services.deid.engine.verify import verify
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import bundle
from services.shared.wsi.sniff import SlideFormat
from services.tiling.core import _unpacked_entry
from tests.fixtures import wsigen

P = Pseudonymizer(b"series-test-key-0123456789abcdef", "siteS")
SLIDES = Path(__file__).resolve().parents[3] / "shared" / "slides" / "dicom"


def _pack(files: list[Path], dst: Path) -> Path:
    members = bundle.upload_files(files)
    assert members is not None
    bundle.pack(dst, members)
    return dst


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> wsigen.Fixture:
    return wsigen.dicom_series(tmp_path_factory.mktemp("in"), np.random.default_rng(31))


@pytest.fixture(scope="module")
def out(fx: wsigen.Fixture, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, Path]:
    tmp = tmp_path_factory.mktemp("out")
    dst = tmp / "slide.zip"
    report = deidentify_and_verify(fx.path, dst, SlideFormat.DICOM_WSI, P)
    with zipfile.ZipFile(dst) as zf:
        zf.extractall(tmp / "x")
    return dst, report, tmp / "x"


def _datasets(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def _leaks(data: bytes, planted: dict[str, bytes]) -> list[str]:
    found = []
    for where, value in planted.items():
        forms = {value}
        with contextlib.suppress(UnicodeDecodeError):
            forms.add(value.decode("utf-8").encode("utf-16-le"))
        if any(f in data for f in forms):
            found.append(where)
    return found


def test_planted_values_gone_from_every_output_byte(
    fx: wsigen.Fixture, out: tuple[Path, object, Path]
) -> None:
    dst, _r, folder = out
    assert _leaks(dst.read_bytes(), fx.planted) == []
    for p in folder.iterdir():
        assert _leaks(p.read_bytes(), fx.planted) == [], p.name


def test_label_and_overview_instances_are_dropped(
    fx: wsigen.Fixture, out: tuple[Path, object, Path]
) -> None:
    dst, report, folder = out
    flavors = [str(ds.ImageType[2]) for ds in _datasets(folder)]
    assert flavors == ["VOLUME", "VOLUME", "THUMBNAIL"]
    data = dst.read_bytes()
    for kind, frames in fx.associated.items():
        assert frames[100:3000] not in data, kind
    assert report.removed["dicom_instance.LABEL"] == 1  # type: ignore[attr-defined]
    assert report.removed["dicom_instance.OVERVIEW"] == 1  # type: ignore[attr-defined]


def test_uids_are_remapped_consistently(fx: wsigen.Fixture, out: tuple[Path, object, Path]) -> None:
    _d, _r, folder = out
    dss = _datasets(folder)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        original = fx.planted[kw].decode()
        assert {str(ds.get(kw)) for ds in dss} == {P.uid(original)}, kw
    sops = [P.uid(fx.planted[f"SOPInstanceUID[{i}]"].decode()) for i in range(5)]
    assert [str(ds.SOPInstanceUID) for ds in dss] == sops[:3]
    for ds in dss:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    refs = [str(r.ReferencedSOPInstanceUID) for r in dss[0].ReferencedImageSequence]
    assert refs == sops[1:]  # the kept level 1 and thumbnail resolve to their new UIDs
    assert set(refs[:2]) <= {str(ds.SOPInstanceUID) for ds in dss}


def test_deidentification_marks_on_every_instance(out: tuple[Path, object, Path]) -> None:
    _d, _r, folder = out
    for ds in _datasets(folder):
        assert ds.PatientIdentityRemoved == "YES"
        code = ds.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
        assert not any(e.tag.is_private for e in ds.iterall())


def test_frames_unchanged_and_openslide_reads_the_series(
    fx: wsigen.Fixture, out: tuple[Path, object, Path]
) -> None:
    dst, report, folder = out
    data = dst.read_bytes()
    for level in fx.level_segments:
        for frame in level:
            assert frame in data
    assert report.level_dimensions == [(1024, 768), (512, 384)]  # type: ignore[attr-defined]
    assert fx.source is not None
    before = openslide.OpenSlide(str(fx.source / "instance0.dcm"))
    after = openslide.OpenSlide(str(folder / "instance-0000.dcm"))
    try:
        assert after.level_dimensions == before.level_dimensions == ((1024, 768), (512, 384))
        assert set(after.associated_images) == {"thumbnail"}
        for level in (0, 1):
            a = np.asarray(before.read_region((0, 0), level, (300, 200)))
            b = np.asarray(after.read_region((0, 0), level, (300, 200)))
            assert np.array_equal(a, b)
    finally:
        before.close()
        after.close()


def test_tiling_opens_the_deidentified_series(
    out: tuple[Path, object, Path], tmp_path: Path
) -> None:
    dst, _r, _f = out
    copy = tmp_path / "slide"
    shutil.copy(dst, copy)
    entry = _unpacked_entry(copy, tmp_path / "bundle")
    slide = openslide.OpenSlide(str(entry))
    assert slide.level_count == 2
    slide.close()


def test_real_boxes_series(tmp_path: Path) -> None:
    src = _pack([SLIDES / "boxes"], tmp_path / "boxes.zip")
    dst = tmp_path / "out.zip"
    report = deidentify_and_verify(src, dst, SlideFormat.DICOM_WSI, P)
    data = dst.read_bytes()
    for value in (b"CPAPERIOCS", b"PixelMed", b"Bangor", b"20091229", b"Filename=CMU-1"):
        assert value not in data, value
    originals = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (SLIDES / "boxes").iterdir()}
    assert not any(u.encode() in data for u in originals)
    with zipfile.ZipFile(dst) as zf:
        zf.extractall(tmp_path / "x")
    dss = _datasets(tmp_path / "x")
    assert [str(ds.ImageType[2]) for ds in dss] == ["VOLUME", "THUMBNAIL"]
    assert len({str(ds.SeriesInstanceUID) for ds in dss}) == 1
    slide = openslide.OpenSlide(str(tmp_path / "x" / "instance-0000.dcm"))
    try:
        assert slide.level_dimensions == ((16, 16),)
        assert set(slide.associated_images) == {"thumbnail"}
        slide.read_region((0, 0), 0, (16, 16))
    finally:
        slide.close()
    assert report.levels_kept == 1


def test_real_bpaec_series_drops_label_and_map(tmp_path: Path) -> None:
    files = [p for p in sorted((SLIDES / "BPAEC").iterdir()) if p.name != "readme.txt"]
    src = _pack(files, tmp_path / "bpaec.zip")
    dst = tmp_path / "out.zip"
    report = deidentify_and_verify(src, dst, SlideFormat.DICOM_WSI, P)
    assert report.removed["dicom_instance.LABEL"] == 1
    assert report.removed["dicom_instance.REGIONLOCALIZER"] == 1
    assert report.levels_kept == 8
    assert report.level_dimensions[0] == (3072, 2304)
    data = dst.read_bytes()
    assert b"20120327165454" not in data
    label = pydicom.dcmread(SLIDES / "BPAEC" / "2")
    assert str(label.SOPInstanceUID).encode() not in data
    with zipfile.ZipFile(dst) as zf:
        names = zf.namelist()
        flavors = {str(pydicom.dcmread(zf.open(n)).ImageType[2]) for n in names}
    assert len(names) == 8 and flavors == {"VOLUME"}


def _variant(fx: wsigen.Fixture, tmp: Path, index: int, **attrs: str) -> Path:
    assert fx.source is not None
    folder = tmp / "v"
    shutil.copytree(fx.source, folder)
    p = folder / f"instance{index}.dcm"
    ds = pydicom.dcmread(p)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(p)
    return _pack([folder], tmp / "v.zip")


def test_thumbnail_showing_the_label_is_dropped(fx: wsigen.Fixture, tmp_path: Path) -> None:
    src = _variant(fx, tmp_path, 2, SpecimenLabelInImage="YES")
    dst = tmp_path / "o.zip"
    report = deidentify_and_verify(src, dst, SlideFormat.DICOM_WSI, P)
    assert report.removed["dicom_instance.THUMBNAIL"] == 1
    with zipfile.ZipFile(dst) as zf:
        assert len(zf.namelist()) == 2


def test_volume_showing_the_label_is_rejected(fx: wsigen.Fixture, tmp_path: Path) -> None:
    src = _variant(fx, tmp_path, 1, SpecimenLabelInImage="YES")
    with pytest.raises(DeidRejected) as exc:
        deidentify_and_verify(src, tmp_path / "o.zip", SlideFormat.DICOM_WSI, P)
    assert exc.value.reason == "LABEL_IN_IMAGE"
    assert not (tmp_path / "o.zip").exists()


def test_mixed_series_and_mixed_patients_are_rejected(fx: wsigen.Fixture, tmp_path: Path) -> None:
    other = wsigen.dicom_wsm(tmp_path, np.random.default_rng(32), name="stranger")
    assert fx.source is not None
    mixed = _pack([*sorted(fx.source.iterdir()), other.path], tmp_path / "mixed.zip")
    with pytest.raises(DeidRejected) as exc:
        deidentify_and_verify(mixed, tmp_path / "o.zip", SlideFormat.DICOM_WSI, P)
    assert exc.value.reason == "MIXED_SERIES"
    patient = _variant(fx, tmp_path / "p", 1, PatientID="SOMEONE-ELSE-42")
    with pytest.raises(DeidRejected) as exc:
        deidentify_and_verify(patient, tmp_path / "o.zip", SlideFormat.DICOM_WSI, P)
    assert exc.value.reason == "MIXED_SERIES"


def test_series_without_a_volume_is_rejected(fx: wsigen.Fixture, tmp_path: Path) -> None:
    assert fx.source is not None
    only = _pack([fx.source / "instance3.dcm", fx.source / "instance4.dcm"], tmp_path / "l.zip")
    with pytest.raises(DeidRejected) as exc:
        deidentify_and_verify(only, tmp_path / "o.zip", SlideFormat.DICOM_WSI, P)
    assert exc.value.reason == "NO_PYRAMID_LEVEL"


def test_verifier_rejects_an_inconsistent_series(
    out: tuple[Path, object, Path], tmp_path: Path
) -> None:
    _d, report, folder = out
    work = tmp_path / "w"
    shutil.copytree(folder, work)
    p = work / "instance-0001.dcm"
    ds = pydicom.dcmread(p)
    ds.SeriesInstanceUID = "2.25.1234"
    ds.save_as(p)
    bad = tmp_path / "bad.zip"
    bundle.pack(bad, [(q.name, q) for q in sorted(work.iterdir())])
    with pytest.raises(DeidRejected) as exc:
        verify(bad, SlideFormat.DICOM_WSI, report.identifying_values)  # type: ignore[attr-defined]
    assert exc.value.reason == "VERIFICATION_FAILED"
