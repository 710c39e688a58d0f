"""De-identification of single-instance DICOM VL Whole Slide Microscopy files.

Everything before Pixel Data is read with pydicom (``stop_before_pixels``), rebuilt through the
keep-list in :mod:`dicom_rules`, and written with a fresh File Meta header; the Pixel Data
element (native or encapsulated, all fragments and the offset table) is then appended by
streaming its bytes unchanged from the source. Elements after Pixel Data (signatures, padding)
are not copied.
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import warnings
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from services.deid.engine import streams
from services.deid.engine.dicom_rules import (
    BASIC_PROFILE_CODE,
    DATE_VRS,
    DEVICE_TEXT,
    DUMMY_BY_VR,
    EMPTY_WHEN_UNKNOWN,
    FREE_TEXT_VRS,
    IDENTIFYING_CONCEPTS,
    IMPLEMENTATION_VERSION_NAME,
    MAX_LENGTH_BY_VR,
    RULES,
    SPECIMEN_ID_CONCEPTS,
    TEXT_VRS,
    WSM_SOP_CLASS,
    Act,
    canonical_code_meaning,
    value_allowed,
)
from services.deid.engine.model import (
    ASSOCIATED_IMAGE_ONLY,
    BURNED_IN_ANNOTATION,
    LABEL_IN_IMAGE,
    MALFORMED_FILE,
    MISSING_IMAGE_TYPE,
    PSEUDONYM_TOO_LONG,
    UNEXPECTED_DICOM_VALUE,
    UNSUPPORTED_FORMAT,
    UNSUPPORTED_IMAGE_TYPE,
    DeidPolicy,
    DeidRejected,
    Tally,
)
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import codestream
from services.shared.wsi.sniff import (
    DicomHeader,
    DicomStructureError,
    InvalidSlide,
    SlideLimits,
    dicom_objective_power,
    dicom_pixel_spacing_um,
    inspect_dicom_series,
    read_dicom_header,
)

DEIDENTIFICATION_METHOD = "Tessera deid 1: PS3.15 Basic Profile, keyed pseudonyms"
_IDENTIFYING_ACTS = frozenset(
    {
        Act.REMOVE,
        Act.EMPTY,
        Act.DUMMY,
        Act.UID,
        Act.PSEUDO_PATIENT,
        Act.PATIENT_NAME,
        Act.PSEUDO_CONTAINER,
        Act.PSEUDO_SPECIMEN,
        Act.PSEUDO_DEVICE,
    }
)
_PSEUDO_KIND = {
    Act.PSEUDO_PATIENT: "patient",
    Act.PSEUDO_CONTAINER: "container",
    Act.PSEUDO_SPECIMEN: "specimen",
    Act.PSEUDO_DEVICE: "device",
}
_KEPT_CONTENT_TYPES = frozenset({"CODE", "NUMERIC", "UIDREF"})


@dataclass(frozen=True)
class DicomResult:
    width: int
    height: int
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    output_size: int


def load_header(path: Path) -> DicomHeader:
    try:
        return read_dicom_header(path)
    except DicomStructureError as exc:
        reason = "TRUNCATED_FILE" if exc.reason == "TRUNCATED" else MALFORMED_FILE
        if exc.reason == "UNSUPPORTED_TRANSFER_SYNTAX":
            reason = "UNSUPPORTED_COMPRESSION"
        raise DeidRejected(reason, f"DICOM structure: {exc.reason}") from exc


def image_flavor(ds: Dataset) -> str:
    it = ds.get("ImageType")
    values = [str(v).upper() for v in (it or [])]
    return values[2] if len(values) > 2 else ""


def check_instance(ds: Dataset) -> None:
    """Reject instances that are not a pyramid level of a whole slide image."""
    if str(ds.get("SOPClassUID", "")) != WSM_SOP_CLASS:
        raise DeidRejected(
            UNSUPPORTED_FORMAT,
            "SOP Class UID (0008,0016) is not VL Whole Slide Microscopy Image Storage",
        )
    flavor = image_flavor(ds)
    if not flavor:
        raise DeidRejected(MISSING_IMAGE_TYPE, "Image Type (0008,0008) is missing or short")
    if flavor in ("LABEL", "OVERVIEW"):
        raise DeidRejected(ASSOCIATED_IMAGE_ONLY, f"the instance is a {flavor} image")
    if flavor not in ("VOLUME", "THUMBNAIL"):
        raise DeidRejected(
            UNSUPPORTED_IMAGE_TYPE, "Image Type (0008,0008) value 3 is not VOLUME or THUMBNAIL"
        )
    for sfg in ds.get("SharedFunctionalGroupsSequence") or []:
        for ft in sfg.get("WholeSlideMicroscopyImageFrameTypeSequence") or []:
            vals = [str(v).upper() for v in (ft.get("FrameType") or [])]
            if len(vals) > 2 and vals[2] in ("LABEL", "OVERVIEW"):
                raise DeidRejected(ASSOCIATED_IMAGE_ONLY, f"frames are {vals[2]} frames")
    if str(ds.get("SpecimenLabelInImage", "")).upper() == "YES":
        raise DeidRejected(LABEL_IN_IMAGE, "Specimen Label in Image (0048,0010) is YES")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise DeidRejected(BURNED_IN_ANNOTATION, "Burned In Annotation (0028,0301) is YES")


class _Cleaner:
    def __init__(
        self,
        pseudonymizer: Pseudonymizer,
        policy: DeidPolicy,
        tally: Tally,
        patient_pseudonym: str | None,
    ) -> None:
        self.p = pseudonymizer
        self.policy = policy
        self.tally = tally
        self.patient_pseudonym = patient_pseudonym

    # -- helpers ----------------------------------------------------------------------------
    def _pseudonym(self, kind: str, value: str, vr: str, keyword: str) -> str:
        pseudo = self.p.pseudonym(kind, value)
        if len(pseudo) > MAX_LENGTH_BY_VR.get(vr, 64):
            raise DeidRejected(PSEUDONYM_TOO_LONG, f"pseudonym does not fit {keyword}")
        return pseudo

    def _uid(self, value: str) -> str:
        return self.p.uid(value)

    # -- dataset ----------------------------------------------------------------------------
    def _year(self, elem: DataElement) -> str | None:
        """date_policy="year": DA/DT reduced to 1 January of their year (PS3.15 "modified
        dates"); None when the policy removes dates or the value is not a plain date."""
        if self.policy.date_policy != "year" or elem.VR not in ("DA", "DT"):
            return None
        value = str(elem.value or "").strip()
        m = re.match(r"^(\d{4})(?:\d{2}|-\d{2})", value)
        if not m or not "1000" <= m.group(1) <= "2999":
            return None
        return m.group(1) + ("0101" if elem.VR == "DA" else "0101000000")

    def clean(self, ds: Dataset) -> Dataset:
        out = Dataset()
        for elem in _elements(ds):
            self._clean_element(elem, out)
        if "CodeMeaning" in ds:
            self._code_meaning(ds, out)
        return out

    def _code_meaning(self, ds: Dataset, out: Dataset) -> None:
        """Code Meaning is free text: it is regenerated from the code (value, scheme) and the
        code dictionary, never copied (see dicom_rules.canonical_code_meaning)."""
        value = str(ds.get("CodeValue") or ds.get("LongCodeValue") or ds.get("URNCodeValue") or "")
        scheme = str(ds.get("CodingSchemeDesignator") or "")
        given = str(ds.get("CodeMeaning") or "")
        meaning = canonical_code_meaning(value.strip(), scheme.strip(), given)
        if meaning != given.strip():
            self.tally.remove("dicom_attribute.CodeMeaning")
        out.CodeMeaning = meaning[:64]

    def _clean_element(self, elem: DataElement, out: Dataset) -> None:
        tag = elem.tag
        kw = elem.keyword or f"{int(tag):08X}"
        if tag.is_private:
            self.tally.remove("dicom_private_tag", *_private_values(elem))
            return
        if tag.element == 0 or tag.group == 0x0002:
            return  # group lengths and stray meta elements are regenerated or dropped
        act = RULES.get(int(tag))
        if act is None:
            self.tally.remove(f"dicom_unknown_attribute.{kw}")
            return
        vr = elem.VR
        if act is Act.KEEP:
            if vr in DATE_VRS:
                self.tally.remove(f"dicom_attribute.{kw}", _text_values(elem))
                return
            if vr == "SQ":
                act = Act.SEQ
            else:
                if kw == "ICCProfile" and not _icc_clean(elem.value):
                    # free text in the profile: dropped (display colour only, not pixels)
                    self.tally.remove("dicom_attribute.ICCProfile")
                    return
                if vr in FREE_TEXT_VRS and not value_allowed(kw, _str_values(elem)):
                    if kw in DEVICE_TEXT:
                        self.tally.remove(f"dicom_attribute.{kw}", _str_values(elem))
                        return
                    if kw in EMPTY_WHEN_UNKNOWN:
                        self.tally.remove(f"dicom_attribute.{kw}", _str_values(elem))
                        out.add(DataElement(tag, vr, None))
                        return
                    raise DeidRejected(
                        UNEXPECTED_DICOM_VALUE, f"{kw} holds a value outside its vocabulary"
                    )
                out.add(DataElement(tag, vr, elem.value))
                return
        if act is Act.SEQ:
            items = [self.clean(item) for item in (elem.value or [])]
            out.add(DataElement(tag, "SQ", Sequence(items)))
        elif act is Act.CONTENT:
            out.add(DataElement(tag, "SQ", Sequence(self._content_items(elem.value or []))))
        elif act is Act.SPECIMEN_PREPARATION:
            if self.policy.dicom_specimen_preparation == "filter":
                items = [self.clean(item) for item in (elem.value or [])]
                out.add(DataElement(tag, "SQ", Sequence(items)))
            else:
                self._empty_sequence(elem, out, kw)
        elif act is Act.SEQ_EMPTY:
            self._empty_sequence(elem, out, kw)
        elif act is Act.UID:
            values = _str_values(elem)
            if not any(values):
                out.add(DataElement(tag, vr, elem.value))
                return
            new = [self._uid(v) if v else "" for v in values]
            self.tally.pseudonymize(f"dicom_uid.{kw}", *[v for v in values if v])
            out.add(DataElement(tag, vr, new[0] if len(new) == 1 else new))
        elif act is Act.EMPTY:
            year = self._year(elem)
            if not _is_empty(elem):
                self.tally.remove(f"dicom_attribute.{kw}", _text_values(elem))
            out.add(DataElement(tag, vr, year))
        elif act is Act.DUMMY:
            if vr not in DUMMY_BY_VR:
                raise DeidRejected(MALFORMED_FILE, f"{kw} has an unexpected VR")
            year = self._year(elem)
            if not _is_empty(elem):
                self.tally.remove(f"dicom_attribute.{kw}", _text_values(elem))
            out.add(DataElement(tag, vr, year or DUMMY_BY_VR[vr]))
        elif act is Act.REMOVE:
            self.tally.remove(f"dicom_attribute.{kw}", _identifying_values(elem))
        elif act is Act.CODE_MEANING:
            return  # regenerated by clean() from the code of the same item
        elif act is Act.REPLACED:
            self.tally.remove(f"dicom_attribute.{kw}")
        elif act is Act.PATIENT_NAME:
            if not _is_empty(elem):
                self.tally.identifying(_text_values(elem))
                if self.patient_pseudonym:
                    self.tally.pseudonymize(f"dicom_attribute.{kw}")
                else:
                    self.tally.remove(f"dicom_attribute.{kw}")
            out.add(DataElement(tag, "PN", self.patient_pseudonym or None))
        elif act in _PSEUDO_KIND:
            value = str(elem.value or "").strip() if vr != "SQ" else ""
            if not value:
                out.add(DataElement(tag, vr, elem.value if vr != "SQ" else None))
                return
            pseudo = self._pseudonym(_PSEUDO_KIND[act], value, vr, kw)
            self.tally.pseudonymize(f"dicom_attribute.{kw}", value)
            out.add(DataElement(tag, vr, pseudo))
        else:  # pragma: no cover - exhaustive over Act
            raise DeidRejected(MALFORMED_FILE, f"no handler for {kw}")

    def _empty_sequence(self, elem: DataElement, out: Dataset, kw: str) -> None:
        if elem.value:
            self.tally.remove(f"dicom_attribute.{kw}", _identifying_values(elem))
        out.add(DataElement(elem.tag, "SQ", Sequence([])))

    def _content_items(self, items: Iterable[Dataset]) -> list[Dataset]:
        kept: list[Dataset] = []
        for item in items:
            vt = str(item.get("ValueType", "")).upper()
            concept = _concept(item)
            if vt in _KEPT_CONTENT_TYPES:
                kept.append(self.clean(item))
            elif vt == "TEXT" and concept in SPECIMEN_ID_CONCEPTS:
                text = str(item.get("TextValue", "") or "").strip()
                rest = Dataset()
                for sub in _elements(item):
                    if sub.keyword != "TextValue":
                        rest.add(sub)
                cleaned = self.clean(rest)
                if text:
                    cleaned.TextValue = self._pseudonym("specimen", text, "UT", "TextValue")
                    self.tally.pseudonymize("dicom_content_item.specimen_identifier", text)
                kept.append(cleaned)
            else:
                self.tally.remove(
                    f"dicom_content_item.{vt or 'UNKNOWN'}", _content_identifying(item)
                )
        return kept


def _icc_clean(value: object) -> bool:
    return isinstance(value, bytes) and codestream.icc_profile_texts(value)[0]


def _elements(ds: Dataset) -> list[DataElement]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(ds)


def _is_empty(elem: DataElement) -> bool:
    v = elem.value
    return v is None or v == "" or v == b"" or (isinstance(v, list | tuple) and not v)


def _str_values(elem: DataElement) -> list[str]:
    v = elem.value
    if v is None:
        return []
    if isinstance(v, str | bytes):
        return [v.decode("latin-1") if isinstance(v, bytes) else v]
    try:
        return [str(x) for x in v]
    except TypeError:
        return [str(v)]


def _text_values(elem: DataElement) -> list[str]:
    if elem.VR not in TEXT_VRS:
        return []
    return [s for s in _str_values(elem) if s]


def _private_values(elem: DataElement) -> list[str]:
    if elem.tag.element < 0x100:
        return []  # private creator: a vendor name, not identifying
    if elem.VR == "SQ":
        vals: list[str] = []
        for item in elem.value or []:
            for sub in _elements(item):
                vals.extend(
                    _private_values(sub) if sub.tag.is_private else _identifying_values(sub)
                )
        return vals
    if elem.VR in TEXT_VRS:
        return _text_values(elem)
    if elem.VR in ("UN", "OB") and isinstance(elem.value, bytes) and len(elem.value) <= 4096:
        raw = elem.value.rstrip(b"\x00 ")
        if raw and all(32 <= b < 127 for b in raw):
            return [raw.decode("ascii")]
    return []


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    code = seq[0]
    return (str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", "")))


def _content_identifying(item: Dataset) -> list[str]:
    vt = str(item.get("ValueType", "")).upper()
    vals: list[str] = []
    if vt == "TEXT" and _concept(item) in IDENTIFYING_CONCEPTS:
        vals.append(str(item.get("TextValue", "") or ""))
    for kw in ("DateTime", "Date", "Time", "PersonName"):
        if kw in item:
            vals.append(str(item.get(kw) or ""))
    return vals


def _identifying_values(elem: DataElement) -> list[str]:
    """Values inside an element being removed that identify (per the profile rules)."""
    if elem.tag.is_private:
        return _private_values(elem)
    if elem.VR != "SQ":
        act = RULES.get(int(elem.tag))
        if act in _IDENTIFYING_ACTS or (act is None and elem.VR in DATE_VRS):
            if elem.keyword == "TextValue":
                return []  # content items are judged by their concept (see below)
            return _text_values(elem)
        return []
    vals: list[str] = []
    for item in elem.value or []:
        if "ValueType" in item:
            vals.extend(_content_identifying(item))
        for sub in _elements(item):
            vals.extend(_identifying_values(sub))
    return vals


_DECODE_ERRORS = (
    BytesLengthException,  # a value length that is not a multiple of the VR's size (fuzzing)
    # pydicom reads a sequence's items from the value bytes and raises OSError("No tag to
    # read...") on corrupt ones (fuzzing); the header is in memory here, so it is no I/O error
    OSError,
    NotImplementedError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    UnicodeError,
    struct.error,
)


def _clean_dataset(
    ds: Any, hdr: DicomHeader, pseudonymizer: Pseudonymizer, policy: DeidPolicy, tally: Tally
) -> Dataset:
    check_instance(ds)
    if hdr.pixel is None:
        raise DeidRejected(MALFORMED_FILE, "the instance holds no Pixel Data (7FE0,0010)")
    if not str(ds.get("SOPInstanceUID", "")):
        raise DeidRejected(MALFORMED_FILE, "SOP Instance UID (0008,0018) is missing")
    patient_id = str(ds.get("PatientID", "") or "").strip()
    cleaner = _Cleaner(pseudonymizer, policy, tally, None)
    patient_pseudonym = (
        cleaner._pseudonym("patient", patient_id, "LO", "PatientID") if patient_id else None
    )
    cleaner.patient_pseudonym = patient_pseudonym
    return cleaner.clean(ds)


def deidentify_dicom(
    src: Path, dst: Path, pseudonymizer: Pseudonymizer, policy: DeidPolicy, tally: Tally
) -> DicomResult:
    hdr = load_header(src)
    ds = hdr.dataset
    try:
        out = _clean_dataset(ds, hdr, pseudonymizer, policy, tally)
    except _DECODE_ERRORS as exc:
        # pydicom decodes values lazily: a malformed element surfaces while it is visited
        raise DeidRejected(
            MALFORMED_FILE, f"a DICOM element cannot be decoded ({type(exc).__name__})"
        ) from exc
    pixel = hdr.pixel
    if pixel is None:  # checked by _clean_dataset; restated for the type checker
        raise DeidRejected(MALFORMED_FILE, "the instance holds no Pixel Data (7FE0,0010)")
    if pixel.encapsulated:
        with open(src, "rb") as fh:
            bad = codestream.frame_text_problem(fh, pixel.fragments)
        if bad is not None:
            # frames are copied verbatim (with their offset tables); text segments inside
            # them cannot be stripped here, so the instance is rejected
            raise DeidRejected(
                UNEXPECTED_DICOM_VALUE,
                f"Pixel Data fragment {bad} carries a JPEG comment/APPn segment",
            )
    tally.discard(*DUMMY_BY_VR.values())
    if hdr.trailing_bytes:
        tally.remove("dicom_trailing_data")
    # de-identification marks (PS3.15 E.1.1 items 6 and 7)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    out.DeidentificationMethodCodeSequence = Sequence([code])
    out.LongitudinalTemporalInformationModified = (
        "MODIFIED" if policy.date_policy == "year" else "REMOVED"
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(WSM_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(str(out.SOPInstanceUID))
    meta.TransferSyntaxUID = UID(hdr.transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out.file_meta = meta
    out.preamble = b"\x00" * 128
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.partial")
    try:
        with open(tmp, "wb") as fdst, open(src, "rb") as fsrc:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pydicom.dcmwrite(fdst, out, enforce_file_format=True)
            fdst.write(pixel.header)
            streams.copy_range(fsrc, fdst, pixel.value_offset, pixel.length, policy.buffer_size)
            fdst.flush()
            if policy.fsync:
                os.fsync(fdst.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, dst)
    except (OSError, EOFError, ValueError) as exc:
        raise DeidRejected(MALFORMED_FILE, f"writing failed: {type(exc).__name__}") from exc
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()
    w = _int(ds, "TotalPixelMatrixColumns") or _int(ds, "Columns")
    h = _int(ds, "TotalPixelMatrixRows") or _int(ds, "Rows")
    mpp_x, mpp_y = dicom_pixel_spacing_um(ds)
    return DicomResult(w, h, mpp_x, mpp_y, dicom_objective_power(ds), size)


def _int(ds: Any, kw: str) -> int:
    try:
        return int(ds.get(kw) or 0)
    except (TypeError, ValueError):
        return 0


# --- a series of instances (bundle) ----------------------------------------------------------
MIXED_SERIES = "MIXED_SERIES"
NO_PYRAMID_LEVEL = "NO_PYRAMID_LEVEL"
# instances that show the glass slide (label, overview photo, localizer maps): dropped
DROPPED_FLAVORS = frozenset({"LABEL", "OVERVIEW", "LOCALIZER", "REGIONLOCALIZER"})


@dataclass(frozen=True)
class SeriesResult:
    level_dimensions: list[tuple[int, int]]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    output_size: int
    instances_kept: int


def _shows_label(ds: Dataset) -> bool:
    return (
        str(ds.get("SpecimenLabelInImage", "")).upper() == "YES"
        or str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
    )


def deidentify_dicom_series(
    src: Path,
    dst: Path,
    pseudonymizer: Pseudonymizer,
    policy: DeidPolicy,
    tally: Tally,
    limits: SlideLimits | None = None,
) -> SeriesResult:
    """A bundle of the instances of one slide: LABEL / OVERVIEW / localizer instances are
    dropped, a THUMBNAIL is kept only when it is not marked as showing the label, every other
    instance is de-identified as a single instance. UIDs are replaced by keyed UIDs, so every
    UID (Study, Series, Frame of Reference, SOP Instance, and the references to them inside
    sequences) maps to the same new value in every instance of the slide."""
    from services.deid.engine.mrxs import bundle_scratch, unpack_bundle
    from services.shared.wsi import bundle

    with bundle_scratch(dst) as tmp:
        _lay, files = unpack_bundle(src, tmp / "in", bundle.KIND_DICOM)
        try:  # the structural checks of ingestion (one series, geometry, frames), once more
            inspect_dicom_series(list(files.values()), limits or SlideLimits(), 0)
        except InvalidSlide as exc:
            raise DeidRejected(exc.reason, exc.message) from exc
        headers = []
        for path in files.values():
            ds = load_header(path).dataset
            if str(ds.get("SOPClassUID", "")) != WSM_SOP_CLASS:
                raise DeidRejected(
                    UNSUPPORTED_FORMAT, "a series member is not a whole-slide image instance"
                )
            headers.append((path, ds))
        keys = {
            (
                str(ds.get("StudyInstanceUID", "")),
                str(ds.get("SeriesInstanceUID", "")),
                str(ds.get("PatientID", "") or "").strip(),
            )
            for _p, ds in headers
        }
        if len(keys) != 1 or not all(next(iter(keys))[:2]):
            raise DeidRejected(
                MIXED_SERIES, "the bundle mixes instances of several series or patients"
            )
        kept: list[tuple[tuple[bool, int], Path, Dataset]] = []
        for path, ds in headers:
            flavor = image_flavor(ds)
            if flavor in DROPPED_FLAVORS or (flavor == "THUMBNAIL" and _shows_label(ds)):
                tally.remove(f"dicom_instance.{flavor}", str(ds.get("SOPInstanceUID", "")))
                continue
            size = _int(ds, "TotalPixelMatrixColumns") * _int(ds, "TotalPixelMatrixRows")
            kept.append(((flavor != "VOLUME", -size), path, ds))  # levels first, largest first
        if not any(image_flavor(ds) == "VOLUME" for _k, _p, ds in kept):
            raise DeidRejected(NO_PYRAMID_LEVEL, "the series has no VOLUME instance")
        kept.sort(key=lambda k: k[0])
        out_dir = tmp / "out"
        out_dir.mkdir()
        members: list[tuple[str, Path]] = []
        levels: list[tuple[int, int]] = []
        first: DicomResult | None = None
        for n, (_k, path, ds) in enumerate(kept):
            out = out_dir / f"instance-{n:04d}.dcm"
            res = deidentify_dicom(path, out, pseudonymizer, policy, tally)
            members.append((out.name, out))
            if image_flavor(ds) == "VOLUME":
                levels.append((res.width, res.height))
                first = first or res
        assert first is not None
        size = bundle.pack(dst, members)
    return SeriesResult(levels, first.mpp_x, first.mpp_y, first.objective_power, size, len(members))
