"""Image files of a detection set: a cheap header check when the set is built, and reading as RGB.

`check_header` opens a file without decoding its pixels (PIL reads the header
only), so a missing, corrupt, wrongly sized or unsupported file fails when the
dataset is built, not at its first read an epoch later.

`read_rgb` gives 8-bit RGB. PIL's `convert("RGB")` clips 16-bit grayscale
(mode I;16) to 0/255, which turns an image white; those are scaled to 8 bits
here: value / 257 rounded (65535 -> 255). PIL itself reads 16-bit RGB, RGBA
and gray+alpha PNGs as 8-bit modes (high byte, value // 256), which is correct
to within 1 and needs nothing. Float and 32-bit integer images have no fixed
range and are refused.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes that convert("RGB") maps correctly (alpha dropped).
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                             "CMYK", "YCbCr", "LAB", "HSV"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_sixteen_bit(mode: str, image_format) -> bool:
    """True for 16-bit grayscale; PNG has no 32-bit gray, so mode I from a PNG is 16-bit."""
    return mode in SIXTEEN_BIT_MODES or (mode == "I" and image_format == "PNG")


def check_header(path: str, name: str, width: int, height: int) -> None:
    """Raise ValueError naming `path` and `name` (e.g. "image 7 of ann.json") unless the file
    is a readable image of `width` x `height` pixels in a mode `read_rgb` supports."""
    try:
        with Image.open(path) as image:
            mode, size, image_format = image.mode, image.size, image.format
    except _UNREADABLE as error:
        raise ValueError(f"{path} ({name}) is not a readable image: {error}") from error
    if mode not in EIGHT_BIT_MODES and not is_sixteen_bit(mode, image_format):
        raise ValueError(f"{path} ({name}) has pixel mode {mode!r} ({image_format}); expected "
                         "an 8-bit image or a 16-bit PNG/TIFF (float and 32-bit images have "
                         "no fixed range: convert them to 8-bit RGB)")
    if size != (width, height):
        raise ValueError(f"{path} is {size[0]}x{size[1]} (w x h) but {name} says "
                         f"{width}x{height}")


def read_rgb(path: str, name: str) -> Image.Image:
    """Decode `path` to an 8-bit RGB PIL image; ValueError naming the file if it is corrupt."""
    try:
        image = Image.open(path)
    except _UNREADABLE as error:
        raise ValueError(f"{path} ({name}) is not a readable image: {error}") from error
    with image:
        if image.mode not in EIGHT_BIT_MODES and not is_sixteen_bit(image.mode, image.format):
            raise ValueError(f"{path} ({name}) has pixel mode {image.mode!r}; expected an "
                             "8-bit image or a 16-bit PNG/TIFF")
        try:
            return _to_rgb(image)
        except _UNREADABLE as error:
            raise ValueError(f"{path} ({name}) cannot be decoded (truncated or corrupt?): "
                             f"{error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from a supported mode (16-bit gray scaled by 1/257, alpha dropped)."""
    if is_sixteen_bit(image.mode, image.format):
        pixels = np.asarray(image).astype(np.float64)  # (H, W), 0..65535
        gray = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    # Palette images with transparency warn unless they go through RGBA.
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")  # grayscale, RGBA, CMYK, ... -> RGB (alpha dropped)
