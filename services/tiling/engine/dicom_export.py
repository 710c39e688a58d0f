"""DICOM WSI archive export: one VL Whole Slide Microscopy Image instance per pyramid level.

Every instance is TILED_FULL, one optical path, one focal plane, in one series (shared
Study/Series/FrameOfReference UIDs, derived deterministically from the slide id so a re-run
writes the same UIDs). Frames are:

* **copied** from a tiled-JPEG TIFF (Aperio SVS, generic tiled TIFF): each source tile becomes
  one JPEG Baseline frame, bytes untouched except for the shared JPEGTables spliced in (and
  the Adobe marker for RGB-coded JPEG), so the archive holds exactly the scanner's pixels.
  Photometric Interpretation follows the stream: ``RGB`` (no colour transform),
  ``YBR_FULL_422`` (subsampled YCbCr) or ``YBR_FULL``;
* otherwise **re-encoded** from OpenSlide reads: JPEG Baseline (``jpeg``, quality 95, 4:2:0,
  ``YBR_FULL_422``: OpenSlide reads no other JPEG colour model) or JPEG 2000 lossless
  (``jpeg2000``, reversible: the decoded source pixels exactly, but ~50-100x slower to
  encode).

Only levels whose downsample from level 0 is (within 1%) an integer are exported: DICOM
readers such as wsidicom place levels by integer pixel-spacing ratios.

Files are written streaming: the dataset is written with pydicom without Pixel Data, then the
encapsulated Pixel Data element is appended frame by frame (a Basic Offset Table is patched in
afterwards when the level is below 4 GiB; above that it stays empty, which readers accept), so
memory stays at one tile row whatever the slide size.

The instances carry no patient or study identity (type-2 attributes empty; the container and
specimen identifier are Tessera's slide id), ``PatientIdentityRemoved = YES``.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
from PIL import Image

from . import jpeg
from .slide import PathLike, SlideHandle, background_colour, flatten, properties_of
from .tiffsource import TiffJpegSource, open_tiff_jpeg

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

VL_WSM: Final = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_BASELINE: Final = "1.2.840.10008.1.2.4.50"
JPEG2000_LOSSLESS: Final = "1.2.840.10008.1.2.4.90"
FALLBACK_TILE: Final = 256
DEFAULT_MPP: Final = 0.25  # micrometres per pixel when the slide declares none
_MAX_BOT: Final = (1 << 32) - 1
Codec = Literal["jpeg", "jpeg2000"]
DicomCodec = Codec


def dicom_series_prefix(slide_id: str) -> str:
    """Object-key prefix of a slide's DICOM series: ``slides/ID/dicom/`` (files
    ``level-{i}.dcm``), next to its pyramid ``slides/ID/dzi/``."""
    from .geometry import validate_slide_id

    return f"slides/{validate_slide_id(slide_id)}/dicom/"


@dataclass(frozen=True)
class DicomLevel:
    path: Path
    width: int
    height: int
    frames: int
    copied: int
    transfer_syntax: str


@dataclass(frozen=True)
class DicomSeries:
    series_uid: str
    study_uid: str
    levels: list[DicomLevel] = field(default_factory=list)

    @property
    def lossless(self) -> bool:
        """True when every frame is the source tile (or a lossless re-encoding of it)."""
        return all(
            lv.copied == lv.frames or lv.transfer_syntax == JPEG2000_LOSSLESS for lv in self.levels
        )


def _uid(slide_id: str, what: str) -> str:
    digest = hashlib.sha256(f"tessera-dicom/{slide_id}/{what}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _dataset(
    slide_id: str,
    *,
    index: int,
    width: int,
    height: int,
    tile: int,
    frames: int,
    mpp: tuple[float, float],
    downsample: float,
    photometric: str,
    transfer_syntax: str,
) -> Dataset:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = VL_WSM
    ds.SOPInstanceUID = _uid(slide_id, f"instance/{index}")
    ds.StudyInstanceUID = _uid(slide_id, "study")
    ds.SeriesInstanceUID = _uid(slide_id, "series")
    ds.FrameOfReferenceUID = _uid(slide_id, "frame-of-reference")
    ds.Modality = "SM"
    original = index == 0
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if original
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    # Patient / study: de-identified, type-2 attributes present and empty.
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Tessera de-identification"
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ContentDate = ""
    ds.ContentTime = ""
    ds.AcquisitionDateTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.Manufacturer = "Tessera"
    ds.ManufacturerModelName = "Tessera DICOM export"
    ds.DeviceSerialNumber = "NONE"
    ds.SoftwareVersions = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ContainerIdentifier = slide_id
    ds.IssuerOfTheContainerIdentifierSequence = Sequence([])
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    ds.AcquisitionContextSequence = Sequence([])
    spec = Dataset()
    spec.SpecimenIdentifier = slide_id
    spec.SpecimenUID = _uid(slide_id, "specimen")
    spec.IssuerOfTheSpecimenIdentifierSequence = Sequence([])
    spec.SpecimenPreparationSequence = Sequence([])
    ds.SpecimenDescriptionSequence = Sequence([spec])
    # Image pixel / matrix.
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.Rows = tile
    ds.Columns = tile
    ds.NumberOfFrames = frames
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.DistanceBetweenFocalPlanes = 0
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    spacing_x = mpp[0] * downsample / 1000.0
    spacing_y = mpp[1] * downsample / 1000.0
    ds.ImagedVolumeWidth = round(width * spacing_x, 6)
    ds.ImagedVolumeHeight = round(height * spacing_y, 6)
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    measures = Dataset()
    measures.PixelSpacing = [round(spacing_y, 9), round(spacing_x, 9)]  # row, column spacing
    measures.SliceThickness = 0.001
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = Sequence(
        [_code("111744", "DCM", "Brightfield illumination")]
    )
    path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    ds.OpticalPathSequence = Sequence([path])
    if transfer_syntax == JPEG_BASELINE:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.LossyImageCompression = "00"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(VL_WSM)
    meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _write_instance(
    target: Path, ds: Dataset, frames: Iterator[bytes], count: int, max_bytes: int
) -> None:
    """Write ``ds`` then its encapsulated Pixel Data from ``frames`` (streamed).
    ``max_bytes`` bounds the Pixel Data size: at or below 4 GiB a Basic Offset Table is
    written (patched once the frame sizes are known), above it the table stays empty."""
    from pydicom import dcmwrite

    with_bot = max_bytes + 8 * count <= _MAX_BOT
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "w+b") as fh:
        dcmwrite(fh, ds, enforce_file_format=True)
        fh.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00" + b"\xff\xff\xff\xff")
        bot_at = fh.tell()
        table = 4 * count if with_bot else 0
        fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, table) + b"\x00" * table)
        first = fh.tell()
        offsets: list[int] = []
        for frame in frames:
            offsets.append(fh.tell() - first)
            pad = b"\x00" if len(frame) % 2 else b""
            fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(frame) + len(pad)))
            fh.write(frame)
            fh.write(pad)
        if len(offsets) != count:
            raise RuntimeError("frame count mismatch")
        fh.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        if with_bot:
            fh.seek(bot_at + 8)
            fh.write(struct.pack(f"<{count}I", *offsets))
    os.replace(tmp, target)


def _photometric_of(frame: bytes, tiff_photometric: int) -> str:
    if tiff_photometric == jpeg.PHOTOMETRIC_RGB:
        return "RGB"
    sampling = _sampling(frame)
    return "YBR_FULL_422" if sampling != (1, 1) else "YBR_FULL"


def _sampling(frame: bytes) -> tuple[int, int]:
    """Luma sampling factors (h, v) from the SOF of a JPEG stream."""
    pos = 2
    while pos + 4 <= len(frame):
        marker = frame[pos + 1]
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            factor = frame[pos + 11]
            return factor >> 4, factor & 0x0F
        if marker == 0xDA:
            break
        pos += 2 + length
    return 1, 1


def _mpp(handle: SlideHandle) -> tuple[float, float]:
    props = properties_of(handle.slide)
    mx, my = props["mpp_x"], props["mpp_y"]
    if mx is None or my is None:
        return DEFAULT_MPP, DEFAULT_MPP
    return float(mx), float(my)


def export_dicom(
    path: PathLike,
    out_dir: PathLike,
    slide_id: str,
    *,
    codec: Codec = "jpeg",
    quality: int = 95,
) -> DicomSeries:
    """Write ``level-{i}.dcm`` for every pyramid level of ``path`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with SlideHandle(path) as handle:
        mpp = _mpp(handle)
    source = open_tiff_jpeg(path)
    if source is not None:
        with source:
            levels = _export_copy(source, out, slide_id, mpp)
    else:
        levels = _export_reencoded(path, out, slide_id, mpp, codec, quality)
    return DicomSeries(_uid(slide_id, "series"), _uid(slide_id, "study"), levels)


def _export_copy(
    source: TiffJpegSource, out: Path, slide_id: str, mpp: tuple[float, float]
) -> list[DicomLevel]:
    levels: list[DicomLevel] = []
    for index, lv in enumerate(source.levels):
        if not _integer_downsample(source.width / lv.width):
            continue
        first = source.jfif_tile(index, 0, 0)
        photometric = _photometric_of(first, lv.photometric)
        count = lv.cols * lv.rows
        ds = _dataset(
            slide_id,
            index=index,
            width=lv.width,
            height=lv.height,
            tile=lv.tile_w,
            frames=count,
            mpp=mpp,
            downsample=source.width / lv.width,
            photometric=photometric,
            transfer_syntax=JPEG_BASELINE,
        )
        if lv.tile_w != lv.tile_h:
            raise ValueError("DICOM frames must be square here")

        def frames(index: int = index, cols: int = lv.cols, rows: int = lv.rows) -> Iterator[bytes]:
            for row in range(rows):
                for col in range(cols):
                    yield source.jfif_tile(index, col, row)

        target = out / f"level-{index}.dcm"
        overhead = len(first) - int(lv.counts[0]) + 9  # tables, marker, item header, pad
        bound = int(lv.counts[:count].sum()) + overhead * count
        _write_instance(target, ds, frames(), count, bound)
        levels.append(DicomLevel(target, lv.width, lv.height, count, count, JPEG_BASELINE))
    return levels


def _export_reencoded(
    path: PathLike,
    out: Path,
    slide_id: str,
    mpp: tuple[float, float],
    codec: Codec,
    quality: int,
) -> list[DicomLevel]:
    levels: list[DicomLevel] = []
    tile = FALLBACK_TILE
    syntax = JPEG_BASELINE if codec == "jpeg" else JPEG2000_LOSSLESS
    photometric = "YBR_FULL_422" if codec == "jpeg" else "RGB"
    with SlideHandle(path) as handle:
        slide = handle.slide
        background = background_colour(slide)
        width0 = slide.dimensions[0]
        for index, (w, h) in enumerate(slide.level_dimensions):
            if not _integer_downsample(width0 / w):
                continue
            cols, rows = -(-w // tile), -(-h // tile)
            downsample = slide.level_downsamples[index]
            ds = _dataset(
                slide_id,
                index=index,
                width=w,
                height=h,
                tile=tile,
                frames=cols * rows,
                mpp=mpp,
                downsample=width0 / w,
                photometric=photometric,
                transfer_syntax=syntax,
            )

            def frames(
                index: int = index, cols: int = cols, rows: int = rows, ds_: float = downsample
            ) -> Iterator[bytes]:
                for row in range(rows):
                    for col in range(cols):
                        loc = (round(col * tile * ds_), round(row * tile * ds_))
                        region = slide.read_region(loc, index, (tile, tile))
                        yield _encode_frame(flatten(region, background), codec, quality)

            target = out / f"level-{index}.dcm"
            bound = cols * rows * (tile * tile * 3 + 4096)  # never above raw pixels
            _write_instance(target, ds, frames(), cols * rows, bound)
            levels.append(DicomLevel(target, w, h, cols * rows, 0, syntax))
    return levels


def _integer_downsample(value: float) -> bool:
    return abs(value - round(value)) <= 0.01


def _encode_frame(image: Image.Image, codec: Codec, quality: int) -> bytes:
    if codec == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, subsampling=2, icc_profile=None)
        return buffer.getvalue()
    import imagecodecs

    return bytes(
        imagecodecs.jpeg2k_encode(np.asarray(image), level=0, codecformat="j2k", reversible=True)
    )
