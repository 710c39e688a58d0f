"""Entry points: :func:`deidentify` and :func:`deidentify_and_verify`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from services.deid.engine import (
    aperio,
    dicom_deid,
    generic_tiff,
    hamamatsu,
    macro,
    mrxs,
    ome_tiff,
    philips,
    qptiff,
    ventana,
)
from services.deid.engine.model import (
    FORMAT_MISMATCH,
    MALFORMED_FILE,
    UNSUPPORTED_FORMAT,
    UNSUPPORTED_STRUCTURE,
    DeidPolicy,
    DeidRejected,
    DeidReport,
    Tally,
)
from services.deid.engine.tiff_common import (
    BackgroundWrite,
    FormatTagRules,
    check_level_compression,
    clean_codestream_heads,
    clean_ifd_tags,
    level_segments,
    write_atomically,
)
from services.deid.engine.verify import verify
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import bundle, tiff
from services.shared.wsi.sniff import (
    InvalidSlide,
    SlideFormat,
    SlideLimits,
    inspect_slide,
    pyramid_ifds,
    slide_resolution,
)
from services.shared.wsi.tiff import OutIfd, OutTag, TiffError, TiffIfd


def deidentify(
    src: Path,
    dst: Path,
    fmt: SlideFormat,
    pseudonymizer: Pseudonymizer,
    policy: DeidPolicy | None = None,
    limits: SlideLimits | None = None,
) -> DeidReport:
    """Write a de-identified copy of ``src`` to ``dst`` (atomically) and report what changed.

    Raises :class:`DeidRejected` (nothing is left at ``dst``) when the slide cannot be made
    safe, and its subclass :class:`DeidNeedsReview` (nothing written either) when the file is
    well-formed but holds metadata no rule knows and ``policy.approved_rules`` has no rule
    for it: unknown TIFF tags (``tiff:<code>``), Aperio ImageDescription fields
    (``svs:<key>``), NDPI property keys (``ndpi:<key>``), Philips XML attributes
    (``philips:<name>``) and Ventana iScan attributes (``bif:<name>``). Call :func:`verify`
    on ``dst`` with ``report.identifying_values`` afterwards (or use
    :func:`deidentify_and_verify`).
    """
    policy = policy or DeidPolicy()
    src, dst = Path(src), Path(dst)
    if not fmt.supported:
        raise DeidRejected(UNSUPPORTED_FORMAT, f"format {fmt.value} is not supported")
    tally = Tally(policy.min_forbidden_length, policy.rules)
    if bundle.is_zip(src):  # inspected by the bundle engines, once unpacked
        return _deidentify_bundle(src, dst, fmt, pseudonymizer, policy, tally, limits)
    try:
        info = inspect_slide(src, fmt, limits)
    except InvalidSlide as exc:
        reason = FORMAT_MISMATCH if exc.reason == "FORMAT_MISMATCH" else exc.reason
        raise DeidRejected(reason, exc.message) from exc
    if fmt is SlideFormat.DICOM_WSI:
        res = dicom_deid.deidentify_dicom(src, dst, pseudonymizer, policy, tally)
        return DeidReport(
            fmt,
            res.width,
            res.height,
            [(res.width, res.height)],
            1,
            res.mpp_x,
            res.mpp_y,
            res.objective_power,
            dict(tally.removed),
            dict(tally.pseudonymized),
            res.output_size,
            tally.values,
        )
    return _deidentify_tiff(
        src, dst, fmt, policy, tally, info.mpp_x, info.mpp_y, info.objective_power
    )


def _deidentify_bundle(
    src: Path,
    dst: Path,
    fmt: SlideFormat,
    pseudonymizer: Pseudonymizer,
    policy: DeidPolicy,
    tally: Tally,
    limits: SlideLimits | None,
) -> DeidReport:
    """Multi-file slides (services/shared/wsi/bundle.py): MRXS, or a DICOM series."""
    res: mrxs.MrxsResult | dicom_deid.SeriesResult
    if fmt is SlideFormat.MIRAX:
        try:
            inspect_slide(src, fmt, limits)  # reads Slidedat.ini only
        except InvalidSlide as exc:
            raise DeidRejected(exc.reason, exc.message) from exc
        res = mrxs.deidentify_mrxs_bundle(src, dst, pseudonymizer, policy, tally)
    elif fmt is SlideFormat.DICOM_WSI:
        res = dicom_deid.deidentify_dicom_series(src, dst, pseudonymizer, policy, tally, limits)
    else:
        raise DeidRejected(UNSUPPORTED_FORMAT, f"format {fmt.value} does not come as a bundle")
    w, h = res.level_dimensions[0]
    return DeidReport(
        fmt,
        w,
        h,
        list(res.level_dimensions),
        len(res.level_dimensions),
        res.mpp_x,
        res.mpp_y,
        res.objective_power,
        dict(tally.removed),
        dict(tally.pseudonymized),
        res.output_size,
        tally.values,
    )


def _deidentify_tiff(
    src: Path,
    dst: Path,
    fmt: SlideFormat,
    policy: DeidPolicy,
    tally: Tally,
    mpp_x: float | None,
    mpp_y: float | None,
    power: float | None,
) -> DeidReport:
    try:
        st = tiff.read_tiff(src)
    except TiffError as exc:
        raise DeidRejected(MALFORMED_FILE, f"TIFF structure: {exc.reason}") from exc
    rules: FormatTagRules
    kept: list[TiffIfd]
    levels: list[TiffIfd]
    per_ifd: dict[int, FormatTagRules] = {}
    added: dict[int, OutTag] = {}
    with_children = False
    if fmt is SlideFormat.OME_TIFF:
        res = ome_tiff.clean_ome_xml(ome_tiff.ome_text(st), len(st.ifds), tally, policy)
        kept = [st.ifds[i] for i in res.keep_ifds]
        first = kept[0]
        levels = [first, *first.children.get(tiff.SUB_IFDS, [])]
        rules = FormatTagRules(
            special={
                tiff.IMAGE_DESCRIPTION: ome_tiff.drop_description,
                tiff.SUB_IFDS: ome_tiff.drop_subifds,
            }
        )
        per_ifd[first.offset] = FormatTagRules(
            special={
                tiff.IMAGE_DESCRIPTION: ome_tiff.description_handler(res.xml),
                tiff.SUB_IFDS: ome_tiff.drop_subifds,
            }
        )
        with_children = True
    elif fmt is SlideFormat.QPTIFF:
        sel_q = qptiff.select_ifds(st, tally)
        kept, levels = sel_q.ifds, sel_q.levels
        rules = generic_tiff.RULES
        per_ifd = {off: qptiff.rules(xml) for off, xml in sel_q.xml.items()}
    elif fmt is SlideFormat.PHILIPS_TIFF:
        sel_p = philips.select_ifds(st, tally)
        kept, levels, rules = sel_p.ifds, sel_p.levels, philips.OTHER_RULES
        per_ifd[kept[0].offset] = philips.first_rules(sel_p.xml)
    elif fmt is SlideFormat.VENTANA_BIF:
        sel_v = ventana.select_ifds(st, tally)
        kept, levels, rules = sel_v.ifds, sel_v.levels, ventana.RULES
        added = sel_v.xmp
    elif fmt is SlideFormat.APERIO_SVS:
        sel_a = aperio.select_ifds(st, policy, tally)
        kept, levels, rules = sel_a.ifds, sel_a.levels, aperio.RULES
    elif fmt is SlideFormat.HAMAMATSU_NDPI:
        sel_h = hamamatsu.select_ifds(st, tally)
        kept, levels, rules = sel_h.ifds, sel_h.levels, hamamatsu.rules(policy)
    else:
        sel_g = generic_tiff.select_ifds(st, tally)
        kept, levels, rules = sel_g.ifds, sel_g.levels, generic_tiff.RULES
    if fmt is not SlideFormat.OME_TIFF:  # OME: the XML, not the IFD order, names the images
        must_keep = {ifd.offset for ifd in pyramid_ifds(st, fmt)}
        if not must_keep <= {ifd.offset for ifd in kept}:
            raise DeidRejected(MALFORMED_FILE, "pyramid level selection is inconsistent")
    if not levels:
        raise DeidRejected(MALFORMED_FILE, "pyramid level selection is inconsistent")

    def convert(ifd: TiffIfd, where: str, ifd_rules: FormatTagRules) -> OutIfd:
        """The IFD's tags, cleaned, and its image data as it is in the source (the tile
        headers are scanned afterwards, by ``heads``)."""
        check_level_compression(ifd, where)
        segments = level_segments(ifd, st, where)
        try:
            tags = clean_ifd_tags(ifd, where, tally, ifd_rules)
        except TiffError as exc:
            raise DeidRejected(MALFORMED_FILE, f"{where}: {exc.reason}") from exc
        extra = added.get(ifd.offset)
        if extra is not None:
            tags = [t for t in tags if t.code != extra.code] + [extra]
        year = year_of_tiff_datetime(ifd) if policy.date_policy == "year" else None
        if year is not None:
            tags = [t for t in tags if t.code != DATETIME] + [OutTag.ascii(DATETIME, year)]
        out = OutIfd(tags, segments, ifd.is_tiled)
        scans.append((ifd, out, where))
        return out

    def heads(fsrc: BinaryIO) -> bool:
        """Text segments dropped from the tile headers; True if any header changed."""
        changed = False
        for ifd, out, where in scans:
            edits = clean_codestream_heads(fsrc, ifd, out.segments, where, tally)
            if edits:
                if tiff.NDPI_MCU_STARTS in ifd.tags:
                    out.tags = shift_mcu_starts(ifd, out.tags, out.segments, edits, where,
                                                st.byteorder)  # fmt: skip
                out.edits = edits
                changed = True
        return changed

    scans: list[tuple[TiffIfd, OutIfd, str]] = []
    placed: list[tuple[int, OutIfd]] = []
    for ifd in kept:
        where = f"IFD {ifd.index}"
        out = convert(ifd, where, per_ifd.get(ifd.offset, rules))
        if with_children:
            for n, kid in enumerate(ifd.children.get(tiff.SUB_IFDS, [])):
                if kid.children:
                    raise DeidRejected(UNSUPPORTED_STRUCTURE, f"{where}: nested SubIFDs")
                out.children.append(convert(kid, f"{where} SubIFD {n}", rules))
        placed.append((ifd.index, out))
    if policy.macro_policy == "blank_label":
        for ifd in macro.macro_ifds(st, fmt):
            where = f"IFD {ifd.index}"
            check_level_compression(ifd, where)
            level_segments(ifd, st, where)
            try:
                tags = clean_ifd_tags(ifd, where, tally, macro.macro_rules(rules, ifd))
            except TiffError as exc:
                raise DeidRejected(MALFORMED_FILE, f"{where}: {exc.reason}") from exc
            placed.append((ifd.index, macro.blank_macro(src, st, ifd, tags, policy, tally)))
    out_ifds = [out for _i, out in sorted(placed, key=lambda p: p[0])]
    with open(src, "rb") as fsrc:
        if tally.review_items:
            # Every IFD is examined (a corrupt tile header still rejects the slide), then the
            # items no rule knows hold the slide for review, all listed at once; nothing is
            # written.
            heads(fsrc)
            tally.raise_for_review()
        # The layout without header edits is final unless the scan finds text segments in
        # tile headers (rare): the image data is copied while the headers are scanned.
        background = BackgroundWrite(src, dst, out_ifds, st, policy)
        try:
            changed = heads(fsrc)
        except BaseException:
            background.cancel()
            raise
    if changed:
        background.cancel()
        result = write_atomically(src, dst, out_ifds, st, policy)
    else:
        result = background.commit()
    if mpp_x is None:
        mpp_x, mpp_y, power = slide_resolution(st, fmt, levels[0])
    return DeidReport(
        format=fmt,
        width=levels[0].width,
        height=levels[0].height,
        level_dimensions=[(i.width, i.height) for i in levels],
        levels_kept=len(levels),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=power,
        removed=dict(tally.removed),
        pseudonymized=dict(tally.pseudonymized),
        output_size=result.size,
        identifying_values=tally.values,
    )


def shift_mcu_starts(
    ifd: TiffIfd,
    tags: list[OutTag],
    segments: Sequence[tuple[int, int]],
    edits: dict[int, tuple[bytes, int]],
    where: str,
    byteorder: tiff.ByteOrder,
) -> list[OutTag]:
    """NDPI McuStarts (65426, high words in 65432) are offsets into the single strip; when
    text segments were removed from the strip header, every start moves back by the bytes
    removed (all starts lie in the entropy-coded data, after the header)."""
    if len(segments) != 1 or set(edits) != {0}:
        raise DeidRejected(UNSUPPORTED_STRUCTURE, f"{where}: NDPI level with several strips")
    head, skip = edits[0]
    delta = skip - len(head)
    starts_tag = ifd.tags[tiff.NDPI_MCU_STARTS]
    high_tag = ifd.tags.get(65432)
    try:
        starts = starts_tag.ints()
        highs = high_tag.ints() if high_tag is not None else [0] * len(starts)
    except TiffError as exc:
        raise DeidRejected(MALFORMED_FILE, f"{where}: McuStarts: {exc.reason}") from exc
    if len(highs) != len(starts):
        raise DeidRejected(MALFORMED_FILE, f"{where}: McuStarts high words do not match")
    full = [(h << 32) | v for v, h in zip(starts, highs, strict=True)]
    if any(v < skip for v in full):
        raise DeidRejected(UNSUPPORTED_STRUCTURE, f"{where}: McuStarts point into the header")
    moved = [v - delta for v in full]
    out = [t for t in tags if t.code not in (tiff.NDPI_MCU_STARTS, 65432)]
    out.append(
        OutTag.ints(
            tiff.NDPI_MCU_STARTS, starts_tag.dtype, [v & 0xFFFFFFFF for v in moved], byteorder
        )
    )
    if high_tag is not None:
        out.append(OutTag.ints(65432, high_tag.dtype, [v >> 32 for v in moved], byteorder))
    return out


DATETIME = 306
_TIFF_DATETIME = re.compile(r"^\s*(\d{4})[:\-/]\d{2}[:\-/]\d{2}")


def year_of_tiff_datetime(ifd: TiffIfd) -> str | None:
    """date_policy="year": TIFF DateTime reduced to 1 January, midnight, of its year."""
    tag = ifd.get(DATETIME)
    if tag is None or tag.dtype != tiff.ASCII:
        return None
    m = _TIFF_DATETIME.match(tag.text())
    if not m or not "1000" <= m.group(1) <= "2999":
        return None
    return f"{m.group(1)}:01:01 00:00:00"


def deidentify_and_verify(
    src: Path,
    dst: Path,
    fmt: SlideFormat,
    pseudonymizer: Pseudonymizer,
    policy: DeidPolicy | None = None,
    extra_forbidden: Sequence[bytes] = (),
) -> DeidReport:
    """:func:`deidentify` then :func:`verify`; the output is deleted if verification fails.

    ``extra_forbidden``: identifying values known from elsewhere (e.g. the clinical metadata
    submitted with the upload) that must not appear in the output either.
    """
    report = deidentify(src, dst, fmt, pseudonymizer, policy)
    try:
        verify(Path(dst), fmt, [*report.identifying_values, *extra_forbidden], policy)
    except BaseException:
        with suppress(FileNotFoundError):
            Path(dst).unlink()
        raise
    return report
