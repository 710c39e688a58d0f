"""Transport-free tiling core: Deep Zoom pyramids, thumbnails and low-resolution reads of
local slide files (any format OpenSlide opens), plus the DZI geometry / object-key layout.

All functions are synchronous CPU work; run them in a thread or process pool.
"""

from .deepzoom import (
    PLACEHOLDER_COLOUR,
    DeepZoomBuilder,
    DziBuildSummary,
    Tile,
    TilePosition,
    build_dzi_to_directory,
)
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
    "DziBuildSummary",
    "DziError",
    "DziGeometry",
    "InvalidTileAddressError",
    "SlideOpenError",
    "SlideReadError",
    "Tile",
    "TileAddress",
    "TileOutOfRangeError",
    "TilePosition",
    "build_dzi_to_directory",
    "dzi_object_keys",
    "make_thumbnail",
    "open_slide",
    "parse_tile_path",
    "read_low_res_rgb",
    "slide_properties",
    "thumbnail_key",
    "tile_key",
    "tile_relative_path",
    "validate_slide_id",
]
