"""Generic tiled (Big)TIFF rules.

Tiled IFDs that form a consistent pyramid with level 0 are the levels (see
``sniff.generic_pyramid``); every other image - stripped IFDs (thumbnails, labels) and tiled
IFDs outside the pyramid sequence (a tiled label with the slide's aspect ratio) - is dropped.
ImageDescription is dropped unless empty; the common rules drop DateTime, Artist,
HostComputer, Software, DocumentName, PageName, XMP, IPTC, Photoshop and EXIF/GPS IFDs.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.deid.engine.model import Tally
from services.deid.engine.tiff_common import FormatTagRules
from services.shared.wsi import tiff
from services.shared.wsi.sniff import generic_pyramid
from services.shared.wsi.tiff import OutTag, TiffIfd, TiffStructure, TiffTag


def _description_handler(tag: TiffTag, tally: Tally) -> OutTag | None:
    text = tag.text()
    if tag.dtype == tiff.ASCII and not text.strip():
        return None  # empty: nothing to keep either
    tally.remove("tiff_tag.ImageDescription", text if len(text) <= 4096 else None)
    return None


RULES = FormatTagRules(special={tiff.IMAGE_DESCRIPTION: _description_handler})


@dataclass(frozen=True)
class Selection:
    ifds: list[TiffIfd]
    levels: list[TiffIfd]


def select_ifds(st: TiffStructure, tally: Tally) -> Selection:
    """Keep the pyramid levels (and their transparency masks); drop every other image:
    stripped IFDs ("associated_image.unidentified") and tiled IFDs that are not a level of the
    pyramid ("associated_image.unknown", see sniff.generic_pyramid)."""
    pyr = generic_pyramid(st)
    keep = {i.offset for i in (*pyr.levels, *pyr.masks)}
    kept: list[TiffIfd] = []
    for ifd in st.ifds:
        if not ifd.is_tiled:
            tally.remove("associated_image.unidentified")
        elif ifd.offset in keep:
            kept.append(ifd)
        else:
            tally.remove("associated_image.unknown")
    return Selection(kept, list(pyr.levels))
