"""Entry points: :func:`deidentify` and :func:`deidentify_and_verify`."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from services.deid.engine import aperio, dicom_deid, generic_tiff, hamamatsu
from services.deid.engine.model import (
    FORMAT_MISMATCH,
    MALFORMED_FILE,
    UNSUPPORTED_FORMAT,
    DeidPolicy,
    DeidRejected,
    DeidReport,
    Tally,
)
from services.deid.engine.tiff_common import (
    FormatTagRules,
    check_level_compression,
    clean_ifd_tags,
    level_segments,
    write_atomically,
)
from services.deid.engine.verify import verify
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import tiff
from services.shared.wsi.sniff import (
    InvalidSlide,
    SlideFormat,
    SlideLimits,
    inspect_slide,
    pyramid_ifds,
    slide_resolution,
)
from services.shared.wsi.tiff import OutIfd, TiffError, TiffIfd


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
    safe. Call :func:`verify` on ``dst`` with ``report.identifying_values`` afterwards (or use
    :func:`deidentify_and_verify`).
    """
    policy = policy or DeidPolicy()
    src, dst = Path(src), Path(dst)
    if not fmt.supported:
        raise DeidRejected(UNSUPPORTED_FORMAT, f"format {fmt.value} is not supported")
    try:
        info = inspect_slide(src, fmt, limits)
    except InvalidSlide as exc:
        reason = FORMAT_MISMATCH if exc.reason == "FORMAT_MISMATCH" else exc.reason
        raise DeidRejected(reason, exc.message) from exc
    tally = Tally(policy.min_forbidden_length)
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
    if fmt is SlideFormat.APERIO_SVS:
        sel_a = aperio.select_ifds(st, policy, tally)
        kept, levels, rules = sel_a.ifds, sel_a.levels, aperio.RULES
    elif fmt is SlideFormat.HAMAMATSU_NDPI:
        sel_h = hamamatsu.select_ifds(st, tally)
        kept, levels, rules = sel_h.ifds, sel_h.levels, hamamatsu.rules(policy)
    else:
        sel_g = generic_tiff.select_ifds(st, tally)
        kept, levels, rules = sel_g.ifds, sel_g.levels, generic_tiff.RULES
    must_keep = {ifd.offset for ifd in pyramid_ifds(st, fmt)}
    if not must_keep <= {ifd.offset for ifd in kept} or not levels:
        raise DeidRejected(MALFORMED_FILE, "pyramid level selection is inconsistent")
    out_ifds: list[OutIfd] = []
    for ifd in kept:
        where = f"IFD {ifd.index}"
        check_level_compression(ifd, where)
        segments = level_segments(ifd, st, where)
        try:
            tags = clean_ifd_tags(ifd, where, tally, rules)
        except TiffError as exc:
            raise DeidRejected(MALFORMED_FILE, f"{where}: {exc.reason}") from exc
        out_ifds.append(OutIfd(tags, segments, ifd.is_tiled))
    result = write_atomically(src, dst, out_ifds, st, policy)
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
