"""Slide bundles (services/shared/wsi/bundle.py): safe unpacking, recognition, canonical
packing, what the CLI bundles, and the clear rejections ingestion gives hostile bundles."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from services.shared.wsi import bundle
from services.shared.wsi.sniff import InvalidSlide, SlideFormat, inspect_slide, sniff_file
from tests.fixtures import wsigen

BOXES = Path(__file__).resolve().parents[3] / "shared" / "slides" / "dicom" / "boxes"


@pytest.fixture(scope="module")
def mrxs(tmp_path_factory: pytest.TempPathFactory) -> wsigen.Fixture:
    return wsigen.mrxs_slide(tmp_path_factory.mktemp("mrxs"), np.random.default_rng(11))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> wsigen.Fixture:
    return wsigen.dicom_series(tmp_path_factory.mktemp("series"), np.random.default_rng(12))


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _reason(path: Path) -> str:
    with pytest.raises(InvalidSlide) as exc:
        inspect_slide(path)
    return exc.value.reason


def test_mrxs_bundle_is_recognised_and_inspected(mrxs: wsigen.Fixture) -> None:
    assert sniff_file(mrxs.path) is SlideFormat.MIRAX
    info = inspect_slide(mrxs.path)
    assert info.format is SlideFormat.MIRAX
    assert info.level_dimensions == ((1024, 1024), (512, 512), (256, 256))
    assert (info.mpp_x, info.objective_power) == (0.25, 20.0)


def test_dicom_series_bundle_is_recognised_and_inspected(series: wsigen.Fixture) -> None:
    assert sniff_file(series.path) is SlideFormat.DICOM_WSI
    info = inspect_slide(series.path)
    assert info.format is SlideFormat.DICOM_WSI
    assert info.level_dimensions == ((1024, 768), (512, 384))  # LABEL/OVERVIEW not levels


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    for name in ("../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "a\\..\\evil.dcm", "C:x"):
        p = _zip(tmp_path / "slip.zip", [(name, b"x")])
        assert _reason(p) == bundle.UNSAFE_BUNDLE, name
        with pytest.raises(bundle.BundleError):
            bundle.list_members(p)


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("slide/link")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    p = _zip(tmp_path / "link.zip", [(info, b"/etc/passwd")])
    assert _reason(p) == bundle.UNSAFE_BUNDLE


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    p = _zip(tmp_path / "bomb.zip", [("a.dcm", b"\x00" * (64 << 20))])
    assert p.stat().st_size < 1 << 20
    assert _reason(p) == bundle.BUNDLE_TOO_LARGE


def test_total_size_and_entry_count_are_bounded(tmp_path: Path) -> None:
    p = _zip(tmp_path / "many.zip", [(f"f{i}.dcm", b"x") for i in range(20)])
    with pytest.raises(bundle.BundleError) as exc:
        bundle.list_members(p, bundle.BundleLimits(max_entries=10))
    assert exc.value.reason == bundle.BUNDLE_TOO_LARGE
    with pytest.raises(bundle.BundleError) as exc:
        bundle.list_members(p, bundle.BundleLimits(max_total_bytes=10))
    assert exc.value.reason == bundle.BUNDLE_TOO_LARGE


def test_member_that_inflates_past_its_declared_size_fails(tmp_path: Path) -> None:
    p = _zip(tmp_path / "liar.zip", [("a.dcm", b"y" * 4096)])
    data = bytearray(p.read_bytes())
    # lower the declared size in the central directory (the local header is not consulted)
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (100).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    members = bundle.list_members(p)
    with pytest.raises(bundle.BundleError):
        bundle.extract(p, tmp_path / "out", members)


def test_nested_zip_is_refused(tmp_path: Path) -> None:
    inner = _zip(tmp_path / "inner.zip", [("a.dcm", b"x")]).read_bytes()
    assert _reason(_zip(tmp_path / "n1.zip", [("inner.zip", inner)])) == bundle.UNSAFE_BUNDLE
    # a nested archive under an innocent name is found by its content
    assert _reason(_zip(tmp_path / "n2.zip", [("a.dcm", inner)])) == bundle.UNSAFE_BUNDLE


def test_encrypted_member_is_refused(tmp_path: Path) -> None:
    p = _zip(tmp_path / "enc.zip", [("a.dcm", b"x" * 100)])
    data = bytearray(p.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 8] |= 0x1
    p.write_bytes(bytes(data))
    assert _reason(p) == bundle.UNSAFE_BUNDLE


def test_mrxs_without_slidedat_is_refused(mrxs: wsigen.Fixture, tmp_path: Path) -> None:
    with zipfile.ZipFile(mrxs.path) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist() if not n.endswith("Slidedat.ini")]
    p = _zip(tmp_path / "noini.zip", members)
    assert _reason(p) == bundle.MISSING_SLIDEDAT
    only_ini = _zip(tmp_path / "onlyini.zip", [("slide/Slidedat.ini", b"[GENERAL]\n")])
    assert _reason(only_ini) == bundle.MISSING_SLIDEDAT


def test_mixed_series_is_refused(series: wsigen.Fixture, tmp_path: Path) -> None:
    assert series.source is not None
    members = [(p.name, p.read_bytes()) for p in sorted(series.source.iterdir())]
    members += [(f"boxes/{p.name}", p.read_bytes()) for p in sorted(BOXES.iterdir())]
    assert _reason(_zip(tmp_path / "mixed.zip", members)) == "MIXED_SERIES"


def test_non_slide_members_are_refused(tmp_path: Path) -> None:
    p = _zip(tmp_path / "junk.zip", [("notes.txt", b"hello")])
    assert _reason(p) == bundle.NOT_A_SLIDE_BUNDLE
    assert sniff_file(p) is SlideFormat.UNKNOWN


def test_rejection_messages_never_name_members(tmp_path: Path) -> None:
    p = _zip(tmp_path / "slip.zip", [("../Doe-John-1970.dcm", b"x")])
    with pytest.raises(InvalidSlide) as exc:
        inspect_slide(p)
    assert "Doe" not in str(exc.value)


def test_pack_is_deterministic_and_canonical(series: wsigen.Fixture, tmp_path: Path) -> None:
    assert series.source is not None
    members = bundle.upload_files([series.source])
    assert members is not None
    assert [n for n, _ in members] == [f"instance-{i:04d}.dcm" for i in range(5)]
    a, b = tmp_path / "a.zip", tmp_path / "b.zip"
    bundle.pack(a, members)
    bundle.pack(b, list(reversed(members)))
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_upload_files_for_each_way_of_naming_a_slide(
    mrxs: wsigen.Fixture, series: wsigen.Fixture, tmp_path: Path
) -> None:
    assert mrxs.source is not None and series.source is not None
    by_file = bundle.upload_files([mrxs.source])
    by_dir = bundle.upload_files([mrxs.source.parent])
    assert by_file == by_dir
    assert by_file is not None
    names = [n for n, _ in by_file]
    assert names[0] == "slide.mrxs" and "slide/Slidedat.ini" in names
    assert not any(mrxs.source.stem in n for n in names)  # the folder name is not sent
    dcm = sorted(series.source.iterdir())
    several = bundle.upload_files(dcm)
    assert several is not None and len(several) == 5
    assert bundle.upload_files([dcm[0]]) is None  # one plain file: uploaded as it is
    with pytest.raises(ValueError):
        bundle.upload_files([dcm[0], mrxs.source])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError):
        bundle.upload_files([empty])


def test_entry_point_of_an_unpacked_bundle(mrxs: wsigen.Fixture, tmp_path: Path) -> None:
    lay = bundle.layout(mrxs.path)
    bundle.extract(mrxs.path, tmp_path / "x", lay.members)
    assert bundle.entry_point(tmp_path / "x").name == "slide.mrxs"


def test_strict_ini_parser() -> None:
    ini = bundle.parse_ini(b"\xef\xbb\xbf[A]\r\nK=V\r\n; comment\r\n[B]\r\nX = 1\r\n")
    assert ini.sections == {"A": {"K": "V"}, "B": {"X": "1"}}
    for bad in (b"K=V\n", b"[A]\nK=V\nK=W\n", b"[A]\n[A]\n", b"[A]\nnot a pair\n", b"\xff\xfe"):
        with pytest.raises(bundle.BundleError):
            bundle.parse_ini(bad)


def test_member_both_file_and_folder_is_refused(tmp_path: Path) -> None:
    p = _zip(tmp_path / "clash.zip", [("a", b"x"), ("a/b.dcm", b"y")])
    assert _reason(p) == bundle.UNSAFE_BUNDLE


def test_corrupt_member_is_a_clear_rejection(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    p = _zip(tmp_path / "bad.zip", [("a.dcm", b"\x00" * 128 + b"DICM" + rng.bytes(5000))])
    data = bytearray(p.read_bytes())
    start = 30 + len("a.dcm")  # the local header, then the deflated bytes
    data[start : start + 40] = b"\xff" * 40
    p.write_bytes(bytes(data))
    assert _reason(p) == bundle.BAD_BUNDLE


# --- through ingestion (in-memory fakes, as tests/unit/test_ingestion_core.py) ---------------
@pytest.fixture
async def ingest(tmp_path: Path):  # type: ignore[no-untyped-def]
    from services.shared.events import TOPIC_SLIDE_RECEIVED
    from tests.unit.test_ingestion_core import make_world

    world = make_world(tmp_path)
    await world.bus.ensure_topics([TOPIC_SLIDE_RECEIVED])
    await world.publisher.start()
    await world.ing.ensure_ready()
    yield world
    await world.publisher.stop()


async def test_ingestion_accepts_bundles_with_their_format(
    ingest, mrxs: wsigen.Fixture, series: wsigen.Fixture
) -> None:  # type: ignore[no-untyped-def]
    from tessera.common.v1 import common_pb2
    from tests.unit.test_ingestion_core import header_for

    for fx, fmt in (
        (mrxs, common_pb2.SLIDE_FORMAT_MRXS),
        (series, common_pb2.SLIDE_FORMAT_DICOM_WSI),
    ):
        data = fx.path.read_bytes()
        res = await ingest.upload(data, header_for(data, filename="slide.zip"))
        assert res.format == fmt
    assert [e.slide_received.format for e in ingest.received_events()] == [
        common_pb2.SLIDE_FORMAT_MRXS,
        common_pb2.SLIDE_FORMAT_DICOM_WSI,
    ]
    assert [e.slide_received.extension for e in ingest.received_events()] == ["zip", "zip"]
    assert ingest.spool_files() == []


async def test_ingestion_rejects_hostile_bundles_precisely(
    ingest, tmp_path: Path, series: wsigen.Fixture
) -> None:  # type: ignore[no-untyped-def]
    from services.shared.errors import InvalidArgument
    from tests.unit.test_ingestion_core import header_for

    assert series.source is not None
    mixed = [(p.name, p.read_bytes()) for p in sorted(series.source.iterdir())]
    mixed += [(f"b/{p.name}", p.read_bytes()) for p in sorted(BOXES.iterdir())]
    cases = {
        "UNSAFE_BUNDLE": [("../../etc/cron.d/x", b"x")],
        "BUNDLE_TOO_LARGE": [("a.dcm", b"\x00" * (32 << 20))],
        "MISSING_SLIDEDAT": [("slide.mrxs", b""), ("slide/Data0000.dat", b"x")],
        "MIXED_SERIES": mixed,
    }
    for reason, members in cases.items():
        data = _zip(tmp_path / f"{reason}.zip", members).read_bytes()
        with pytest.raises(InvalidArgument) as err:
            await ingest.upload(data, header_for(data, filename="slide.zip"))
        assert err.value.reason == reason
    await ingest.assert_nothing_left()
