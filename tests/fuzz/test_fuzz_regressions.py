"""Inputs the fuzzer found, replayed through the same worker and property (success or a
domain error, never another exception, within the time limit)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from services.shared.wsi import tiff
from tests.fuzz.harness import Runner, Seed, apply


def _entry(data: bytes, code: int) -> int:
    """File offset of the first IFD's entry for tag `code` (classic or BigTIFF)."""
    st = tiff.read_tiff(data)
    big = st.is_bigtiff
    bo = st.byteorder
    first = st.ifds[0].offset
    n = struct.unpack_from(bo + ("Q" if big else "H"), data, first)[0]
    head, size = (8, 20) if big else (2, 12)
    for i in range(n):
        at = first + head + i * size
        if struct.unpack_from(bo + "H", data, at)[0] == code:
            return at
    raise LookupError(code)


@pytest.mark.parametrize("target", ["inspect", "upload", "deid_bigtiff"])
def test_tile_length_of_a_non_integer_type(
    target: str, seeds: dict[str, Seed], runner: Runner
) -> None:
    """TileLength (323) typed ASCII: `ifd.tile_size` raised TiffError out of inspection, so
    de-identification retried the slide and dead-lettered it instead of rejecting it."""
    seed = seeds["bigtiff"]
    at = _entry(seed.data, 323)
    data = apply(seed, [("int", at + 2, 2, tiff.ASCII)])
    out = runner.run(target, "bigtiff", data)
    assert out.kind in ("ok", "domain"), out
    if target != "upload":
        assert out.label in ("MALFORMED_FILE", "not-inspected:unknown"), out


def test_dicom_with_unreadable_file_meta_is_refused_at_upload(
    seeds: dict[str, Seed], runner: Runner
) -> None:
    """A DICOM preamble over unreadable file meta: sniffing raised InvalidSlide, which the
    upload path did not expect (INTERNAL, and the spooled bytes were kept)."""
    data = apply(seeds["dicom"], [("copy", 128, 137, 139)])
    out = runner.run("upload", "dicom", data)
    assert (out.kind, out.label) == ("domain", "MALFORMED_FILE"), out


@pytest.mark.parametrize("target", ["inspect", "deid_dicom"])
def test_dicom_element_with_an_unknown_vr(
    target: str, seeds: dict[str, Seed], runner: Runner
) -> None:
    """Rows (0028,0010) with the VR bytes corrupted: pydicom raised NotImplementedError from
    the first attribute read during inspection (de-identification retried, dead-lettered)."""
    seed = seeds["dicom"]
    at = seed.data.find(b"\x28\x00\x10\x00US")
    assert at > 0
    data = seed.data[: at + 4] + b"S\x02" + seed.data[at + 6 :]
    out = runner.run(target, "dicom", data)
    assert (out.kind, out.label) == ("domain", "MALFORMED_FILE"), out


CORPUS = Path(__file__).parent / "corpus"


@pytest.mark.parametrize(
    "name",
    [
        # a value length that is not a multiple of its VR's size: pydicom's
        # BytesLengthException out of inspection
        "dicom-bytes-length.dcm",
        # a sequence whose item bytes are corrupt: pydicom's OSError ("No tag to read")
        # out of de-identification
        "dicom-corrupt-sequence.dcm",
    ],
)
def test_dicom_elements_pydicom_cannot_decode(name: str, runner: Runner) -> None:
    """Inputs the fuzzer found (kept as files: the generated seed is not byte-for-byte
    reproducible). Both escaped as unexpected errors (retried, then dead-lettered) instead of
    MALFORMED_FILE."""
    out = runner.run("deid_dicom", "dicom", (CORPUS / name).read_bytes())
    assert (out.kind, out.label) == ("domain", "MALFORMED_FILE"), out


def test_ndpi_whose_output_pages_tifffile_cannot_parse(runner: Runner) -> None:
    """A byte of the NDPI zeroed (found by the fuzzer): the verifier's tifffile cross-check
    raised TypeError while iterating the output's pages (retried, then dead-lettered) instead
    of failing the verification."""
    data = (CORPUS / "ndpi-tifffile-pages.ndpi").read_bytes()
    out = runner.run("deid_ndpi", "ndpi", data)
    assert out.kind == "domain", out


def test_ndpi_whose_output_tile_length_tifffile_reads_as_negative(
    seeds: dict[str, Seed], runner: Runner
) -> None:
    """Two bytes copied within the NDPI (found by the long fuzzing run): tifffile derived a
    negative tile length for the output, and the verifier's read raised ValueError (retried,
    then dead-lettered) instead of failing the verification."""
    data = apply(seeds["ndpi"], [("copy", 146926, 146926, 2), ("copy", 151274, 146926, 255)])
    out = runner.run("deid_ndpi", "ndpi", data)
    assert out.kind == "domain", out
