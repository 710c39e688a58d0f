"""De-identification against generated slides with PLANTED identifying values.

Every fixture of :mod:`tests.fixtures.wsigen` goes through ``deidentify`` + ``verify``:

* no planted value survives anywhere in the output bytes (UTF-8 and UTF-16LE), nor the
  compressed bytes of the label/macro images;
* the compressed tiles/strips/frames of every pyramid level are byte-identical to the input;
* OpenSlide lists no label/macro and returns the same level-0 pixels as for the input;
* the report counts the expected categories and never contains a value;
* hostile variants end in a clean ``DeidRejected`` / ``InvalidSlide`` / ``TiffError`` (never
  another exception), within a time bound enforced by running in a thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile

from services.deid.engine import DeidRejected, DeidReport, deidentify, verify
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi.sniff import InvalidSlide, SlideFormat, read_dicom_header
from services.shared.wsi.tiff import TiffError, read_tiff
from tests.fixtures import wsigen

P = Pseudonymizer(b"planted-test-key-0123456789abcdef", "siteP")
TIME_BOUND = 60.0  # seconds; small fixtures take well under a second
CLEAN_ERRORS = (DeidRejected, InvalidSlide, TiffError)

ALL = wsigen.FIXTURE_NAMES
MAY_PASS_HOSTILE = [
    "hostile_svs_non_ascii",
    "hostile_ascii_raw_bytes",
    "dicom_empty_sequences",
    "hostile_dicom_deep_nesting",
]
TIFF_OR_DICOM_OK = [n for n in ALL if not n.startswith("hostile_") and n not in MAY_PASS_HOSTILE]
MUST_REJECT = [
    "hostile_ifd_loop",
    "hostile_tile_offset_past_eof",
    "hostile_next_ifd_past_eof",
    "hostile_tag_count_2pow40",
    "hostile_svs_truncated",
    "hostile_ndpi_truncated",
    "hostile_dicom_truncated",
    "hostile_5000_ifds",
    "hostile_ndpi_high_offset",
    "hostile_svs_absurd_width",
    "hostile_dicom_missing_frames",
]


def bounded(fn: Callable[[], Any], timeout: float = TIME_BOUND) -> Any:
    """Run ``fn`` in a daemon thread; fail the test if it does not finish in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        pytest.fail(f"did not finish within {timeout:.0f} s (hang on hostile input?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@dataclass
class Outcome:
    fixture: wsigen.Fixture
    out: Path
    report: DeidReport | None
    error: BaseException | None


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, wsigen.Fixture]:
    d = tmp_path_factory.mktemp("wsigen")
    return {f.name: f for f in wsigen.build_all(d, seed=20261203)}


@pytest.fixture(scope="module")
def outcomes(
    generated: dict[str, wsigen.Fixture], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Outcome]:
    out_dir = tmp_path_factory.mktemp("deid-out")
    cache: dict[str, Outcome] = {}

    def get(name: str) -> Outcome:
        if name not in cache:
            fx = generated[name]
            out = out_dir / ("deid-" + fx.path.name)

            def work() -> DeidReport:
                report = deidentify(fx.path, out, fx.fmt, P)
                verify(out, fx.fmt, report.identifying_values)
                return report

            try:
                cache[name] = Outcome(fx, out, bounded(work), None)
            except CLEAN_ERRORS as exc:
                cache[name] = Outcome(fx, out, None, exc)
        return cache[name]

    return get


def succeeded(o: Outcome) -> DeidReport:
    if o.error is not None:
        pytest.fail(
            f"{o.fixture.name}: de-identification rejected a valid slide: "
            f"{type(o.error).__name__}: {o.error}"
        )
    assert o.report is not None
    return o.report


def _leaks(data: bytes, planted: dict[str, bytes]) -> list[str]:
    found = []
    for where, value in planted.items():
        forms = {value}
        with contextlib.suppress(UnicodeDecodeError):
            forms.add(value.decode("utf-8").encode("utf-16-le"))
        if any(f in data for f in forms):
            found.append(where)
    return found


# --- successful de-identification --------------------------------------------------------------
@pytest.mark.parametrize("name", TIFF_OR_DICOM_OK)
def test_planted_values_absent(name: str, outcomes: Callable[[str], Outcome]) -> None:
    o = outcomes(name)
    succeeded(o)
    data = o.out.read_bytes()
    leaks = _leaks(data, o.fixture.planted)
    assert not leaks, f"planted values still in the output, planted at: {leaks}"
    for kind, blob in o.fixture.associated.items():
        assert blob not in data, f"the {kind} image's compressed bytes are still in the output"


@pytest.mark.parametrize("name", TIFF_OR_DICOM_OK)
def test_report_counts_categories_never_values(
    name: str, outcomes: Callable[[str], Outcome]
) -> None:
    o = outcomes(name)
    report = succeeded(o)
    fx = o.fixture
    got_removed = {k: report.removed.get(k) for k in fx.removed}
    assert got_removed == fx.removed
    got_pseudo = {k: report.pseudonymized.get(k) for k in fx.pseudonymized}
    assert got_pseudo == fx.pseudonymized
    text = repr(report) + repr(report.public_dict())
    for where, value in fx.planted.items():
        assert value.decode("utf-8", "replace") not in text, f"report shows value of {where}"
    # category names are vocabulary, never values
    for key in [*report.removed, *report.pseudonymized]:
        assert not any(v.decode("utf-8", "replace") in key for v in fx.planted.values())
    assert report.levels_kept == len(fx.level_segments)


@pytest.mark.parametrize("name", [n for n in TIFF_OR_DICOM_OK if not n.startswith("dicom")])
def test_tiff_level_bytes_identical(name: str, outcomes: Callable[[str], Outcome]) -> None:
    o = outcomes(name)
    succeeded(o)
    fx = o.fixture
    st = read_tiff(o.out)
    ndpi = fx.fmt is SlideFormat.HAMAMATSU_NDPI
    levels = st.ifds if ndpi else [i for i in st.ifds if i.is_tiled]  # NDPI: one-strip levels
    assert len(levels) == len(fx.level_segments)
    with open(o.out, "rb") as fh:
        for lv, (ifd, expected) in enumerate(zip(levels, fx.level_segments, strict=True)):
            got = []
            for off, cnt in ifd.segments():
                fh.seek(off)
                got.append(fh.read(cnt))
            assert len(got) == len(expected), f"level {lv}: segment count"
            for i, (g, e) in enumerate(zip(got, expected, strict=True)):
                assert g == e, f"level {lv} segment {i} differs"
    # tifffile reads the same tiles (for NDPI: the MCU-row tiles it derives from McuStarts)
    with tifffile.TiffFile(o.out, is_ndpi=ndpi) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        assert page.shape[:2] == (levels[0].height, levels[0].width)


@pytest.mark.parametrize("name", [n for n in TIFF_OR_DICOM_OK if n.startswith("dicom")])
def test_dicom_frames_identical(name: str, outcomes: Callable[[str], Outcome]) -> None:
    o = outcomes(name)
    succeeded(o)
    hdr = read_dicom_header(o.out)
    assert hdr.pixel is not None and hdr.pixel.encapsulated
    data = o.out.read_bytes()
    frames = [data[off : off + n] for off, n in hdr.pixel.fragments]
    expected = [f + b"\x00" * (len(f) % 2) for f in o.fixture.level_segments[0]]
    assert frames == expected
    ds = hdr.dataset
    planted = o.fixture.planted
    assert ds.PatientID == P.pseudonym("patient", planted["PatientID"].decode())
    assert str(ds.PatientName) == ds.PatientID
    assert ds.ContainerIdentifier == P.pseudonym(
        "container", planted["ContainerIdentifier"].decode()
    )
    assert ds.PatientIdentityRemoved == "YES"
    assert not any(e.tag.is_private for e in ds.iterall())


def _openslide_level0(path: Path) -> tuple[np.ndarray, set[str], str | None]:
    s = openslide.OpenSlide(str(path))
    try:
        w, h = s.dimensions
        arr = np.asarray(s.read_region((0, 0), 0, (w, h)))[..., :3]
        return arr, set(s.associated_images), s.properties.get("openslide.vendor")
    finally:
        s.close()


@pytest.mark.parametrize("name", TIFF_OR_DICOM_OK)
def test_openslide_no_label_same_pixels(name: str, outcomes: Callable[[str], Outcome]) -> None:
    o = outcomes(name)
    succeeded(o)
    fx = o.fixture
    # every fixture in TIFF_OR_DICOM_OK is one OpenSlide opens: failing to is a failure
    before, assoc_before, vendor_before = _openslide_level0(fx.path)
    after, assoc_after, vendor_after = _openslide_level0(o.out)
    assert vendor_after == vendor_before
    assert not assoc_after & {"label", "macro"}, assoc_after
    assert assoc_after <= {"thumbnail"}
    assert np.array_equal(after, before), "level-0 pixels changed"
    assert fx.level0 is not None
    diff = np.abs(after.astype(np.int16) - fx.level0.astype(np.int16))
    if fx.lossless:
        assert not diff.any()
    else:  # the same JPEG streams, decoded by Pillow here and OpenSlide's libjpeg there
        assert diff.max() <= 8 and diff.mean() < 1.0
    if "label" in fx.associated:
        assert "label" in assoc_before or fx.fmt is SlideFormat.GENERIC_TIFF


# --- hostile input -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MUST_REJECT)
def test_hostile_rejected_cleanly(name: str, outcomes: Callable[[str], Outcome]) -> None:
    o = outcomes(name)  # any exception other than the clean ones propagates and fails here
    assert o.error is not None, f"{name} was accepted: {o.fixture.note}"
    assert isinstance(o.error, CLEAN_ERRORS)
    assert not o.out.exists(), "a rejected slide left an output behind"
    assert not list(o.out.parent.glob(f".{o.out.name}.*")), "partial output left behind"
    message = str(o.error)
    for where, value in o.fixture.planted.items():
        assert value.decode("utf-8", "replace") not in message, f"error shows value of {where}"


@pytest.mark.parametrize("name", MAY_PASS_HOSTILE)
def test_hostile_accepted_or_rejected_cleanly(
    name: str, outcomes: Callable[[str], Outcome]
) -> None:
    o = outcomes(name)
    if o.error is not None:
        assert isinstance(o.error, CLEAN_ERRORS)
        assert not o.out.exists()
        return
    leaks = _leaks(o.out.read_bytes(), o.fixture.planted)
    assert not leaks, f"accepted, but planted values survived at: {leaks}"


def test_generator_cli(tmp_path: Path) -> None:
    assert wsigen.main(["--out", str(tmp_path), "--seed", "3"]) == 0
    manifest = (tmp_path / "manifest.json").read_text()
    for name in wsigen.FIXTURE_NAMES:
        assert f'"name": "{name}"' in manifest
    assert not list(tmp_path.glob("_base_*"))


def test_fixtures_really_carry_the_planted_values(generated: dict[str, wsigen.Fixture]) -> None:
    """Guard against a generator that plants nothing: every text value is in its input."""
    for fx in generated.values():
        data = fx.path.read_bytes()
        if fx.name.endswith("truncated"):
            continue
        missing = [w for w, v in fx.planted.items() if v not in data]
        assert not missing, f"{fx.name}: not actually planted: {missing}"
        for kind, blob in fx.associated.items():
            assert blob in data, f"{fx.name}: {kind} bytes missing from the input"


def test_every_fixture_is_exercised() -> None:
    covered = set(TIFF_OR_DICOM_OK) | set(MUST_REJECT) | set(MAY_PASS_HOSTILE)
    assert covered == set(ALL), sorted(set(ALL) ^ covered)


# --- regressions: values the Aperio validators used to accept (found with these fixtures) -----
def _value_gone_or_rejected(fx: wsigen.Fixture, value: bytes, out: Path) -> None:
    assert value in fx.path.read_bytes(), "fixture does not carry the value"

    def work() -> None:
        report = deidentify(fx.path, out, fx.fmt, P)
        verify(out, fx.fmt, report.identifying_values)

    try:
        bounded(work)
    except CLEAN_ERRORS:
        return  # failing closed is fine
    at = out.read_bytes().find(value)
    assert at < 0, f"the planted value survived de-identification (output offset {at})"


def rng() -> np.random.Generator:
    return np.random.default_rng(4242)


def test_svs_summary_line_token_does_not_survive(tmp_path: Path) -> None:
    """A barcode-like [A-Z0-9]{8} word in the geometry summary (the old _SUMMARY kept it)."""
    fx = wsigen.aperio_svs(tmp_path, rng(), name="svs_summary_token", summary_extra=" PA7F3C91")
    _value_gone_or_rejected(fx, b"PA7F3C91", tmp_path / "out.svs")


def test_svs_header_line_token_does_not_survive(tmp_path: Path) -> None:
    """A free word in the 'Aperio ...' header line (the old _HEADER kept any words)."""
    fx = wsigen.aperio_svs(
        tmp_path, rng(), name="svs_header_token", header="Aperio Image Library PLANT-1a2b3c4d "
    )
    _value_gone_or_rejected(fx, b"PLANT-1a2b3c4d", tmp_path / "out.svs")


def test_svs_icc_profile_field_text_does_not_survive(tmp_path: Path) -> None:
    """Free text in the 'ICC Profile' field (the old _ICC_NAME kept any short text)."""
    fx = wsigen.aperio_svs(
        tmp_path, rng(), name="svs_icc_text", extra_fields=[("ICC Profile", "PLANT-9f8e7d6c")]
    )
    _value_gone_or_rejected(fx, b"PLANT-9f8e7d6c", tmp_path / "out.svs")
