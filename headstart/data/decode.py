"""Decode image files and bytes to 8-bit RGB, safely: EXIF orientation, any mode, clear errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import HeadstartError


class ImageDecodeError(HeadstartError, OSError):
    """One image file could not be read or decoded.

    ``permanent`` is True when the bytes themselves are not a decodable image (empty, truncated,
    not an image format), so retrying the same bytes with the same decoder cannot succeed.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


#: Bump when decoding (orientation, mode conversion, compositing) changes pixel values.
DECODE_VERSION = "decode-1"


def decode_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as an 8-bit RGB PIL image, with its EXIF orientation applied.

    Any mode is converted: palette and alpha images are composited on white, 16-bit and float
    greyscale is rescaled to 8 bits, CMYK is converted by PIL. Only the first frame of an
    animation is used.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, or not an image PIL can decode.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return decode_bytes(data, path)


def decode_bytes(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> Image.Image:
    """Decode an encoded image held in memory, as :func:`decode_image` does; ``path`` is for messages."""
    if not data:
        raise ImageDecodeError(f"{path}: empty file (0 bytes)", permanent=True)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{path}: image too large to decode safely ({exc})", permanent=True) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ImageDecodeError(f"{path}: cannot decode image ({reason})", permanent=True) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.nan_to_num(np.asarray(img, dtype=np.float64))
        low, high = float(array.min()), float(array.max())
        if mode == "F" and low >= 0 and high <= 1:  # float image in [0, 1]
            array = array * 255.0
        elif high > 255 or low < 0:  # a true high-bit-depth image: stretch its range onto 0..255
            scale = 255.0 / (high - low) if high > low else 0.0
            array = (array - low) * scale
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------- finding
