"""Robust image decoding: any PIL mode to 8-bit RGB or grayscale, resized once.

Policy (why): Keras' ``flow_from_directory`` -> ``load_img(color_mode="rgb",
interpolation="nearest")`` converts with ``PIL.Image.convert("RGB")`` (alpha dropped, not
composited) and then resizes with PIL NEAREST straight to 224x224 (aspect ratio not kept).
We do the same so the prepared pixels are those the original Keras classifier saw, with
three deliberate additions: EXIF orientation is applied, 16-bit images are scaled to 8 bit
(``v / 257``; PIL's own conversion would clip them), and ``color="gray"`` (the default)
takes the ITU-R 601 luma of that RGB image (``convert("L")``), so the colour mode of a
file can no longer tell its class.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

COLORS = ("gray", "keep")
IMAGE_SIZE = 224
MAX_IMAGE_SIZE = 1024
# What a size costs, for --help: pixels (disk per gray image, compute per image) grow with its square.
SIZE_COSTS = ("224 px is prepared once for every size up to it; a larger size is prepared "
              "again at that size (once), and disk and compute grow with its square: 512 px is 5.2x "
              "224's (262 KB per gray image), 1024 px 21x (1 MB)")
# Part of every prepared dataset's fingerprint: raise it whenever a change here changes pixels,
# so data prepared by the old decoder is prepared again instead of reused.
DECODER_VERSION = 2
RESAMPLE = Image.Resampling.NEAREST
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def prepared_size(image_size: int) -> int:
    """The size images are prepared at for an input of ``image_size``: 224, which every smaller
    input is downsampled from, or the size itself above 224, so that a larger input holds the
    file's own detail instead of enlarged 224-px pixels."""
    return max(IMAGE_SIZE, image_size)


class NotAnImage(Exception):
    """The bytes are not an image by content (junk beside class folders: skipped and counted; in
    a labels file's row: a bad image)."""


class BadImage(Exception):
    """The bytes look like an image but cannot be decoded (corrupt or truncated)."""


def open_image(data: bytes) -> Image.Image:
    """Decode fully and apply EXIF orientation; raises NotAnImage or BadImage."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise BadImage("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; unset it to detect bad files")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        if data[128:132] == b"DICM":  # a DICOM file's 128-byte preamble, then its magic: PIL reads none
            raise NotAnImage("a DICOM file, which is not read: convert it to PNG") from err
        raise NotAnImage("not an image by content") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"unreadable image header: {err}") from err
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"{image.format} {image.mode} {image.size[0]}x{image.size[1]}: {err}") from err
    return image


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit data scaled by 1/257 and float data, each rounded and clipped, as 8-bit "L"; other
    modes unchanged."""
    if image.mode in _SIXTEEN_BIT:
        pixels = (np.asarray(image, np.int32).clip(0, 65535) + 128) // 257  # rint(x / 257): 257 is odd, no ties
        return Image.fromarray(pixels.astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as Keras' load_img makes it (16-bit and float data: :func:`eight_bit` first)."""
    image = eight_bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pixels(image: Image.Image, color: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 1) for gray, (size, size, 3) for keep, resized with PIL NEAREST.

    The resize comes after :func:`eight_bit` (PIL's nearest resize of 16-bit modes samples other
    pixels than of 8-bit ones) and before the colour conversion: nearest sampling picks source
    pixels and the conversion is per pixel, so the result equals converting the full image first
    (Keras' order), at a fraction of the work. An 8-bit gray image skips the RGB round trip, which
    returns it unchanged (PIL's luma weights sum to exactly 1).
    """
    image = eight_bit(image)
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    if color == "gray" and image.mode == "L":
        out = image
    else:
        rgb = to_rgb(image)
        out = rgb.convert("L") if color == "gray" else rgb
    pixels = np.asarray(out, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def decode(data: bytes, color: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bytes of one file -> prepared pixels; raises NotAnImage or BadImage. ``color`` is one of
    :data:`COLORS`, checked where the settings are (``DataConfig``)."""
    try:
        return to_pixels(open_image(data), color, size)
    except (OSError, ValueError) as err:  # a mode PIL cannot convert
        raise BadImage(str(err)) from err
