"""Synthetic vendor slides for formats without a public sample small enough to commit.

Each generator writes a small tiled JPEG pyramid with the vendor's metadata layout (as publicly
documented) and *planted* identifying values, returned so tests can check that none of them
survives de-identification. These are our own fixtures, not vendor files: their structure is
an assumption about the real formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

PLANTED_PHILIPS = {
    "serial": "PHSERIAL-778899",
    "acq": "20210317101112.000000",
    "barcode": "QkFSQ09ERS1QQVRJRU5U",  # base64 of BARCODE-PATIENT
    "source": "S21-12345_HE_patient.tiff",
    "operator": "jdoe-operator",
    "calib_date": "20210101",
}
PLANTED_BIF = {
    "bar1": "S21-99887-A1",
    "bar2": "2DCODE-4455",
    "date": "03/17/2021",
    "time": "10:11:12",
    "unit": "DP200-UNIT-0042",
    "user": "scanner.operator",
}


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w, 1)), (y * 255 // max(h, 1)), (x ^ y) & 0xFF], -1)
    return (img + rng.integers(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


def _attr(name: str, value: str, pmsvr: str = "IString") -> str:
    head = f'<Attribute Name="{name}" Group="0x0000" Element="0x0000" PMSVR="{pmsvr}">'
    return head + value + "</Attribute>"


def philips_xml(width: int, height: int, levels: int) -> str:
    p = PLANTED_PHILIPS
    reps = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        + _attr("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", str(i), "IUInt16")
        + _attr("PIIM_PIXEL_DATA_REPRESENTATION_COLUMNS", str(width >> i), "IUInt32")
        + _attr("PIIM_PIXEL_DATA_REPRESENTATION_ROWS", str(height >> i), "IUInt32")
        + _attr(
            "DICOM_PIXEL_SPACING", f'"{0.00025 * 2**i:.6f}" "{0.00025 * 2**i:.6f}"', "IDoubleArray"
        )
        + "</DataObject>"
        for i in range(levels)
    )
    wsi = (
        '<DataObject ObjectType="DPScannedImage">'
        + _attr("PIM_DP_IMAGE_TYPE", "WSI")
        + _attr("PIM_DP_IMAGE_ROWS", str(height), "IUInt32")
        + _attr("PIM_DP_IMAGE_COLUMNS", str(width), "IUInt32")
        + _attr("DICOM_DERIVATION_DESCRIPTION", "tiff-useBigTIFF=1-useRgb=0 from " + p["source"])
        + '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" '
        'Element="0x0000" PMSVR="IDataObjectArray"><Array>' + reps + "</Array></Attribute>"
        "</DataObject>"
    )
    label = (
        '<DataObject ObjectType="DPScannedImage">'
        + _attr("PIM_DP_IMAGE_TYPE", "LABELIMAGE")
        + _attr("PIM_DP_IMAGE_DATA", "/9j/4AAQSkZJRgABAQ==", "IString")
        + "</DataObject>"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>'
        '<DataObject ObjectType="DPUfsImport">'
        + _attr("DICOM_MANUFACTURER", "PHILIPS")
        + _attr("DICOM_SOFTWARE_VERSIONS", '"1.8.6824" "20180906_R51"', "IStringArray")
        + _attr("DICOM_DEVICE_SERIAL_NUMBER", p["serial"])
        + _attr("DICOM_ACQUISITION_DATETIME", p["acq"])
        + _attr("DICOM_DATE_OF_LAST_CALIBRATION", f'"{p["calib_date"]}"', "IStringArray")
        + _attr("PIM_DP_UFS_BARCODE", p["barcode"])
        + _attr("PIM_DP_SOURCE_FILE", p["source"])
        + _attr("PIIM_DP_SCANNER_OPERATOR_ID", p["operator"])
        + _attr("PIM_DP_UFS_INTERFACE_VERSION", "3.0")
        + '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" '
        'PMSVR="IDataObjectArray"><Array>' + wsi + label + "</Array></Attribute>"
        "</DataObject>"
    )


def make_philips(path: Path, extra_attr: str = "", *, size: int = 512, levels: int = 3) -> Path:
    """Philips TIFF: tiled JPEG levels, XML on IFD 0, Label and Macro as stripped IFDs."""
    img = _image(size, size)
    xml = philips_xml(size, size, levels)
    if extra_attr:
        xml = xml[: -len("</DataObject>")] + extra_attr + "</DataObject>"
    opts = {"photometric": "rgb", "compression": "jpeg", "tile": (256, 256), "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(img, description=xml, software="Philips DP v1.0", **opts)
        for i in range(1, levels):
            tw.write(img[:: 2**i, :: 2**i], subfiletype=1, description="", **opts)
        tw.write(
            _image(120, 200, 1),
            description="Label",
            photometric="rgb",
            compression="jpeg",
            metadata=None,
        )
        tw.write(
            _image(200, 600, 2),
            description="Macro",
            photometric="rgb",
            compression="jpeg",
            metadata=None,
        )
    return path


def bif_iscan(extra: str = "") -> str:
    p = PLANTED_BIF
    return (
        '<?xml version="1.0" encoding="utf-8"?><Metadata><iScan '
        f'BarCode1D="{p["bar1"]}" BarCode2D="{p["bar2"]}" ScanDate="{p["date"]}" '
        f'ScanTime="{p["time"]}" UnitNumber="{p["unit"]}" UserName="{p["user"]}" '
        f'Magnification="40" ScanRes="0.25" Z-layers="1" Z-spacing="1" '
        f'ScannerModel="VENTANA DP 200" BuildVersion="1.1.0.15854" {extra}>'
        '<AOI0 Left="100" Top="200" Right="900" Bottom="800"/></iScan></Metadata>'
    )


def bif_encode_info(width: int, height: int, tile: int) -> str:
    cols, rows = width // tile, height // tile
    joints = "".join(
        f'<TileJointInfo FlagJoined="1" Confidence="95" Direction="RIGHT" Tile1="{i + 1}" '
        f'Tile2="{i + 2}" OverlapX="0" OverlapY="0"/>'
        for i in range(cols - 1)
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><EncodeInfo Ver="2"><SlideInfo>'
        f'<AoiInfo XIMAGESIZE="{tile}" YIMAGESIZE="{tile}" NumRows="{rows}" NumCols="{cols}" '
        'Pos-X="0" Pos-Y="0"/>'
        f'<ImageInfo AOIScanned="1" AOIIndex="0" Width="{width}" Height="{height}" '
        f'NumRows="{rows}" NumCols="{cols}" Pos-X="0" Pos-Y="0">{joints}</ImageInfo>'
        "</SlideInfo></EncodeInfo>"
    )


def make_bif(path: Path, iscan_extra: str = "", *, size: int = 512, levels: int = 2) -> Path:
    """Ventana BIF (DP 200 layout): Label_Image, Probability, Thumbnail, then levels."""
    img = _image(size, size)
    tile = 256
    xmp0 = bif_iscan(iscan_extra).encode()
    xmp_l0 = bif_encode_info(size, size, tile).encode()
    opts = {"photometric": "rgb", "compression": "jpeg", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            _image(300, 200, 1),
            description="Label_Image",
            extratags=[(700, "B", len(xmp0), xmp0, True)],
            **opts,
        )
        tw.write(_image(100, 300, 2), description="Probability", **opts)
        tw.write(_image(200, 600, 3), description="Thumbnail", **opts)
        for i in range(levels):
            extratags = [(700, "B", len(xmp_l0), xmp_l0, True)] if i == 0 else []
            tw.write(
                img[:: 2**i, :: 2**i],
                description=f"level={i} mag={40 // 2**i} quality=95",
                tile=(tile, tile),
                extratags=extratags,
                **opts,
            )
    return path


def make_ome_pyramid(
    path: Path,
    *,
    xml: str | None = None,
    with_label: bool = False,
    size: int = 512,
    levels: int = 3,
) -> Path:
    """Pyramidal OME-TIFF (levels as SubIFDs), optional label image as a second OME Image."""
    img = _image(size, size)
    opts = {"photometric": "rgb", "compression": "jpeg", "tile": (128, 128)}
    with tifffile.TiffWriter(path, ome=xml is None, bigtiff=False) as tw:
        kw = {} if xml is None else {"description": xml.encode(), "metadata": None}
        tw.write(img, subifds=levels - 1, **opts, **kw)
        for i in range(1, levels):
            tw.write(img[:: 2**i, :: 2**i], subfiletype=1, **opts)
        if with_label:
            tw.write(_image(96, 160, 4), photometric="rgb", compression="jpeg", metadata=None)
    return path
