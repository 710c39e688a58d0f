"""Transport-free tiling core: Deep Zoom pyramids, thumbnails and low-resolution reads of
local slide files (any format OpenSlide opens), plus the DZI geometry / object-key layout.

All functions are synchronous CPU work; run them in a thread or process pool.
"""

from .builder import open_builder
from .deepzoom import (
    PLACEHOLDER_COLOUR,
    DeepZoomBuilder,
    DziBuildSummary,
    Tile,
    TilePosition,
    build_dzi_to_directory,
)
from .dicom_export import DicomCodec, DicomSeries, dicom_series_prefix, export_dicom
from .geometry import (
    CONTENT_TYPES,
    DESCRIPTOR_NAME,
    DZI_NAMESPACE,
    SUPPORTED_FORMATS,
    TILES_DIR_NAME,
    DescriptorError,
    DziError,
    DziGeometry,
    InvalidTileAddressError,
    TileAddress,
    TileOutOfRangeError,
    dzi_object_keys,
    parse_tile_path,
    thumbnail_key,
    tile_key,
    tile_relative_path,
    validate_slide_id,
)
from .parallel import ParallelDeepZoomBuilder
from .pyramid import TiffPyramidBuilder, open_tiff_pyramid
from .slide import (
    SlideOpenError,
    SlideReadError,
    make_thumbnail,
    open_slide,
    read_low_res_rgb,
    slide_properties,
)

__all__ = [
    "CONTENT_TYPES",
    "DESCRIPTOR_NAME",
    "DZI_NAMESPACE",
    "PLACEHOLDER_COLOUR",
    "SUPPORTED_FORMATS",
    "TILES_DIR_NAME",
    "DeepZoomBuilder",
    "DescriptorError",
    "DicomCodec",
    "DicomSeries",
    "DziBuildSummary",
    "DziError",
    "DziGeometry",
    "InvalidTileAddressError",
    "ParallelDeepZoomBuilder",
    "SlideOpenError",
    "SlideReadError",
    "TiffPyramidBuilder",
    "Tile",
    "TileAddress",
    "TileOutOfRangeError",
    "TilePosition",
    "build_dzi_to_directory",
    "dicom_series_prefix",
    "dzi_object_keys",
    "export_dicom",
    "make_thumbnail",
    "open_builder",
    "open_slide",
    "open_tiff_pyramid",
    "parse_tile_path",
    "read_low_res_rgb",
    "slide_properties",
    "thumbnail_key",
    "tile_key",
    "tile_relative_path",
    "validate_slide_id",
]
