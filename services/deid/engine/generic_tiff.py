"""Generic tiled (Big)TIFF rules.

Every tiled IFD is a pyramid level (as for OpenSlide's generic-tiff driver) and must show the
same picture as level 0; stripped IFDs (thumbnails, labels, anything else) are dropped.
ImageDescription is dropped unless empty; the common rules drop DateTime, Artist,
HostComputer, Software, DocumentName, PageName, XMP, IPTC, Photoshop and EXIF/GPS IFDs.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.deid.engine.model import UNEXPECTED_IFD, DeidRejected, Tally
from services.deid.engine.tiff_common import FormatTagRules, aspect_matches
from services.shared.wsi import tiff
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
    tiled = [i for i in st.ifds if i.is_tiled]
    if not tiled:
        return Selection([], [])
    base = tiled[0]
    kept: list[TiffIfd] = []
    for ifd in st.ifds:
        if not ifd.is_tiled:
            tally.remove("associated_image.unidentified")
            continue
        if ifd is not base and not aspect_matches(base, ifd):
            raise DeidRejected(
                UNEXPECTED_IFD, f"tiled IFD {ifd.index} is not a level of the pyramid"
            )
        kept.append(ifd)
    return Selection(kept, [i for i in kept if not i.new_subfile_type & 0x4])
