"""``macro_policy="blank_label"``: keep the slide overview with its label end blacked out.

The macro (SVS: the IFD marked ``macro``; NDPI: SourceLens -1; Philips: the IFD described
``Macro`` - the left-hand label position is an assumption there, no real sample) is decoded,
the label end of the glass slide - the left part of the landscape photograph - is filled with
black, and the image is re-encoded as one self-contained JPEG strip. Only the macro is ever
re-encoded. Ventana BIF is not covered: its overview keeps being removed.

Width of the blanked band: ``macro_label_fraction`` of the macro width (default 1/3: on the
CMU-1 SVS sample the label occupies the left ~22 %, on the NDPI samples ~27 %), rounded up to a
multiple of 16 px so that the band consists of whole JPEG blocks and decodes to exact black.
For NDPI the property map's ``roi.barcode.macro`` (x0,y0,x1,y1 in the frame of
``roi.slide.macro``) widens the band when it reaches further: on the one sample available the
macro is stored mirrored relative to that frame (barcode ROI on the right of the frame, label on
the left of the picture), so a ROI in the right half of the frame is mirrored. The ROI never
narrows the band (assumption checked on one scanner model only).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from services.deid.engine import aperio, hamamatsu, philips
from services.deid.engine.model import CORRUPT_IMAGE_DATA, DeidPolicy, DeidRejected, Tally
from services.deid.engine.tiff_common import FormatTagRules
from services.shared.wsi import tiff
from services.shared.wsi.sniff import SlideFormat, svs_associated_kind
from services.shared.wsi.tiff import OutIfd, OutTag, TiffIfd, TiffStructure, TiffTag

BLOCK = 16
_ROI = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*$")
# strip/JPEG layout tags replaced by the re-encoded strip
_REPLACED = frozenset({tiff.ROWS_PER_STRIP, tiff.JPEG_TABLES, 65426, 65432, 530, 531, 532})


def macro_ifds(st: TiffStructure, fmt: SlideFormat) -> list[TiffIfd]:
    """The slide-overview IFDs that ``macro_policy="blank_label"`` keeps (SVS and NDPI)."""
    if fmt is SlideFormat.APERIO_SVS:
        return [i for i in st.ifds if svs_associated_kind(i) == "macro"]
    if fmt is SlideFormat.HAMAMATSU_NDPI:
        return [i for i in st.ifds if hamamatsu.source_lens(i) == -1]
    if fmt is SlideFormat.PHILIPS_TIFF:
        return [i for i in st.ifds if philips.associated_kind(i) == "macro"]
    return []


SVS_MACRO_DESCRIPTION = re.compile(
    rf"^{aperio.LIBRARY_PATTERN}[ \t]*\r?\nmacro \d{{1,6}}x\d{{1,6}}$"
)


def macro_rules(rules: FormatTagRules, ifd: TiffIfd) -> FormatTagRules:
    """The format's rules, with a fixed SVS macro description ("<header>\\r\\nmacro WxH")."""
    if tiff.IMAGE_DESCRIPTION not in rules.special or 65421 in ifd.tags:
        return rules  # NDPI: no description rule involved
    if philips.associated_kind(ifd) == "macro" and not (ifd.description or "").startswith("Aperio"):
        # Philips: the description is what marks the IFD as the macro; nothing else is kept
        def philips_description(tag: TiffTag, tally: Tally) -> OutTag | None:
            del tag
            tally.remove("philips.macro_description")
            return OutTag.ascii(tiff.IMAGE_DESCRIPTION, "Macro")

        special = {**rules.special, tiff.IMAGE_DESCRIPTION: philips_description}
        return FormatTagRules(special, rules.keep_numeric, rules.remove)

    def description(tag: TiffTag, tally: Tally) -> OutTag | None:
        header = tag.text().split("\n", 1)[0].rstrip("\r")
        if not aperio.header_ok(header):
            header = "Aperio Image Library"
        tally.remove("svs_field.macro_description")
        return OutTag.ascii(tiff.IMAGE_DESCRIPTION, f"{header}\r\nmacro {ifd.width}x{ifd.height}")

    special = {**rules.special, tiff.IMAGE_DESCRIPTION: description}
    return FormatTagRules(special, rules.keep_numeric, rules.remove)


def band_width(width: int, policy: DeidPolicy, roi_end: int | None = None) -> int:
    """Pixels blanked from the left edge of a macro ``width`` px wide."""
    w = int(np.ceil(width * policy.macro_label_fraction))
    if roi_end is not None:
        w = max(w, roi_end)
    return min(width, -(-w // BLOCK) * BLOCK)


def ndpi_roi_end(st: TiffStructure) -> int | None:
    """Right edge (in macro pixels, picture frame) of the NDPI barcode ROI, if given."""
    tag = st.ifds[0].get(65449)
    if tag is None:
        return None
    props: dict[str, str] = {}
    for line in tag.text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value
    slide, barcode = props.get("roi.slide.macro", ""), props.get("roi.barcode.macro", "")
    ms, mb = _ROI.match(slide), _ROI.match(barcode)
    if not ms or not mb:
        return None
    sx0, _sy0, sx1, _sy1 = (int(v) for v in ms.groups())
    bx0, _by0, bx1, _by1 = (int(v) for v in mb.groups())
    if sx1 <= sx0:
        return None
    rel0, rel1 = bx0 - sx0, bx1 - sx0
    span = sx1 - sx0
    if rel0 > span / 2:  # barcode on the right of the frame: the picture is mirrored
        rel0, rel1 = span - rel1, span - rel0
    return max(0, min(span, rel1)) + BLOCK  # a block of margin around the label edge


def _decode(path: Path, ifd: TiffIfd, ndpi: bool) -> np.ndarray:
    import tifffile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tifffile.TiffFile(path, is_ndpi=ndpi) as tf:
                page = tf.pages[ifd.index]
                arr = np.asarray(page.asarray())
    except Exception as exc:
        raise DeidRejected(CORRUPT_IMAGE_DATA, f"IFD {ifd.index}: macro does not decode") from exc
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise DeidRejected(CORRUPT_IMAGE_DATA, f"IFD {ifd.index}: macro is not 8-bit RGB")
    return arr[:, :, :3]


def blank_macro(
    path: Path,
    st: TiffStructure,
    ifd: TiffIfd,
    tags: list[OutTag],
    policy: DeidPolicy,
    tally: Tally,
) -> OutIfd:
    """The macro IFD, re-encoded with its label band black; ``tags`` are its cleaned tags."""
    import imagecodecs

    img = _decode(path, ifd, st.is_ndpi).copy()
    h, w = img.shape[:2]
    roi = ndpi_roi_end(st) if st.is_ndpi else None
    img[:, : band_width(w, policy, roi)] = 0
    photometric = ifd.int_value(tiff.PHOTOMETRIC, 2)
    if photometric == 6:
        data = imagecodecs.jpeg8_encode(img, level=90, subsampling="444")
    else:
        data = imagecodecs.jpeg8_encode(img, level=90, outcolorspace="rgb")
    bo = st.byteorder
    kept = [
        t
        for t in tags
        if t.code not in _REPLACED
        and t.code not in (tiff.COMPRESSION, tiff.PHOTOMETRIC, tiff.SAMPLES_PER_PIXEL, 258)
    ]
    kept += [
        OutTag.ints(tiff.COMPRESSION, tiff.SHORT, [7], bo),
        OutTag.ints(tiff.PHOTOMETRIC, tiff.SHORT, [6 if photometric == 6 else 2], bo),
        OutTag.ints(tiff.SAMPLES_PER_PIXEL, tiff.SHORT, [3], bo),
        OutTag.ints(258, tiff.SHORT, [8, 8, 8], bo),
        OutTag.ints(tiff.ROWS_PER_STRIP, tiff.LONG, [h], bo),
    ]
    if photometric == 6:
        kept.append(OutTag.ints(530, tiff.SHORT, [1, 1], bo))  # 4:4:4, as encoded
    tally.removed["macro.label_band_blanked"] += 1
    return OutIfd(sorted(kept, key=lambda t: t.code), [], False, data=bytes(data))


def check_blanked(path: Path, ifd: TiffIfd, ndpi: bool, policy: DeidPolicy) -> str | None:
    """Verifier: the label band of a kept macro must decode to uniform black."""
    img = _decode(path, ifd, ndpi)
    band = img[:, : band_width(img.shape[1], policy)]
    if band.size == 0 or int(band.max()) > 2:
        return f"IFD {ifd.index}: the macro's label band is not blank"
    return None
