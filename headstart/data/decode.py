"""Decode image files and bytes to 8-bit RGB, safely: EXIF orientation, any mode, clear errors.

What Pillow warns about while decoding (corrupt EXIF data, a malformed MPO or APNG) does not reach
stderr as Pillow's own text: it is captured around the decode and said again as one
:class:`ImageWarning` naming the file, e.g. ``photo.jpg: corrupt EXIF data (ignored, image used)``.
This happens where the image is decoded, DataLoader worker processes included.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from ..errors import HeadstartError


class ImageDecodeError(HeadstartError, OSError):
    """One image file could not be read or decoded.

    ``permanent`` is True when the bytes themselves are not a decodable image (empty, truncated,
    not an image format), so retrying the same bytes with the same decoder cannot succeed.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class ImageWarning(UserWarning):
    """An image was decoded and used, but something in it was ignored (e.g. corrupt EXIF data).

    The message starts with the file's path. Silence them with
    ``warnings.filterwarnings("ignore", category=headstart.data.ImageWarning)``.
    """


#: Pillow's warnings (their start, lower case) -> what the ImageWarning says instead
PIL_WARNINGS: dict[str, str] = {
    "possibly corrupt exif": "corrupt EXIF data (ignored, image used)",
    "corrupt exif": "corrupt EXIF data (ignored, image used)",
    "tag data larger than file": "corrupt EXIF data (ignored, image used)",
    "tag offset too large": "corrupt EXIF data (ignored, image used)",
    "metadata warning": "corrupt EXIF data (ignored, image used)",
    "image appears to be a malformed mpo": "malformed MPO data (read as a plain JPEG, image used)",
    "invalid apng": "invalid APNG animation data (the default image used)",
    "truncated file read": "truncated metadata (ignored, image used)",
}

MAX_PIXELS = 90_000_000  # larger images are refused (a 12,000 x 12,000 PNG took 1.6 GB to decode)
MAX_PIXELS_ENV = "HEADSTART_MAX_PIXELS"

#: Bump when decoding (orientation, mode conversion, compositing) changes pixel values.
DECODE_VERSION = "decode-1"
#: A JPEG decoded at reduced scale (``min_size``) keeps each side at least this many times the size
#: asked for, so the resize after it is still a real downscale with its own antialiasing. Measured on
#: 12-megapixel photos with tf_efficientnet_lite0 (benchmarks/large_photos.py): 1x (DCT 1/8) gives
#: cosine >= 0.998 to the full decode's features, 2x (1/4) >= 0.999, at about the same speed (the
#: entropy decoding, which no scale saves, dominates); 2x is ~5x faster than a full decode + resize.
DRAFT_MARGIN = 2
_ORIENTATION = 0x0112  # EXIF tag
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # where Pillow's getexif looks without EXIF
_SIDEWAYS = (5, 6, 7, 8)  # orientations whose transpose swaps width and height


def decode_image(path: str | os.PathLike[str], min_size: Sequence[int] | None = None) -> Image.Image:
    """Open an image file as an 8-bit RGB PIL image, with its EXIF orientation applied.

    Any mode is converted: palette and alpha images are composited on white, 16-bit and float
    greyscale is rescaled to 8 bits, CMYK is converted by PIL. Only the first frame of an
    animation is used. ``min_size``: decode a large JPEG at reduced scale (see :func:`decode_bytes`).

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
    return decode_bytes(data, path, min_size)


def decode_bytes(data: bytes, path: str | os.PathLike[str] = "<bytes>",
                 min_size: Sequence[int] | None = None) -> Image.Image:
    """Decode an encoded image held in memory, as :func:`decode_image` does; ``path`` is for messages.

    Args:
        min_size: ``(height, width)``, upright, that the caller will resize the image down to; ``None``
            (the default) decodes every pixel. A JPEG whose sides are at least twice
            ``DRAFT_MARGIN * min_size`` is decoded at 1/2, 1/4 or 1/8 scale by its DCT (Pillow's
            ``draft``): the smallest that keeps both sides at least ``DRAFT_MARGIN * min_size``, in
            the stored orientation (before the EXIF transpose). Other formats, and smaller JPEGs, are
            decoded in full, pixel for pixel as without ``min_size``. The pixels depend on
            ``min_size``, so it belongs in the cache key of whatever is computed from them
            (:func:`draft_description`).
    """
    if not data:
        raise ImageDecodeError(f"{path}: empty file (0 bytes)", permanent=True)
    limit = max_pixels()  # a bad $HEADSTART_MAX_PIXELS is a UsageError, not this image's fault
    failure: ImageDecodeError | None = None
    with warnings.catch_warnings(record=True) as caught, _libtiff_output(data) as printed:  # said again below
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked here
        try:
            image = _decode(data, path, min_size, limit)
        except ImageDecodeError as exc:
            failure = exc
    if failure is not None:  # libtiff's own words say more than Pillow's "decoder error -2"
        raise (_with_libtiff(failure, printed[0]) if printed else failure) from None
    texts = [describe_warning(w.message) for w in caught]
    texts += [f"damaged TIFF data (libtiff: {printed[0]}; image used)"] if printed else []
    for text in dict.fromkeys(texts):
        warnings.warn(f"{path}: {text}", ImageWarning, stacklevel=2)
    return image


def _with_libtiff(failure: ImageDecodeError, said: str) -> ImageDecodeError:
    text = str(failure)
    text = f"{text[:-1]}; libtiff: {said})" if text.endswith(")") else f"{text} (libtiff: {said})"
    return ImageDecodeError(text, failure.permanent)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@contextmanager
def _libtiff_output(data: bytes) -> Iterator[list[str]]:
    """Lines that libtiff writes to the process's stderr (file descriptor 2) itself while a TIFF decodes.

    Pillow hands TIFF files to libtiff, whose complaints about damaged files ("LZWDecode: Not enough
    data ...") bypass Python; they are caught here so that the file can be named in one line instead.
    Other formats are decoded by Pillow's own code and pass straight through.
    """
    lines: list[str] = []
    try:
        saved = os.dup(2) if data.startswith(_TIFF_MAGIC) else -1
    except OSError:  # no stderr to protect
        saved = -1
    if saved < 0:
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip()]


def describe_warning(message: Warning | str) -> str:
    """What an :class:`ImageWarning` says for one of Pillow's warnings (its first line, when not known)."""
    lines = str(message).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else type(message).__name__
    low = text.lower()
    return next((ours for start, ours in PIL_WARNINGS.items() if low.startswith(start)),
                f"{text.rstrip('.')} (image used)")


def _decode(data: bytes, path: str | os.PathLike[str], min_size: Sequence[int] | None, limit: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.size, path, limit)
            _draft(img, min_size)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:  # beyond Pillow's own hard limit (2 x 89 MP), whatever ours is
        hard = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageDecodeError(f"{path}: image too large (over {hard / 1e6:.0f} MP, the most Pillow opens; "
                               "resize it, e.g. to 8000 pixels on its longer side)") from None
    except Image.UnidentifiedImageError:  # Pillow's message names a BytesIO object, not the file
        raise ImageDecodeError(f"{path}: cannot decode image (not a format Pillow reads; it starts with "
                               f"{data[:8]!r}: a web page, a text file, an unfinished download?)",
                               permanent=True) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ImageDecodeError(f"{path}: cannot decode image ({reason})", permanent=True) from None


def max_pixels() -> int:
    """The largest image decoded, in pixels: ``$HEADSTART_MAX_PIXELS`` or :data:`MAX_PIXELS`."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        from ..errors import UsageError

        raise UsageError(f"${MAX_PIXELS_ENV} must be a whole number of pixels, e.g. 200000000; got '{value}'")
    return int(value)


def _limit_hint() -> str:
    return f"the limit is {max_pixels() / 1e6:g} MP; set {MAX_PIXELS_ENV} to a larger number of pixels to allow it"


def _check_pixels(size: tuple[int, int], path: str | os.PathLike[str], limit: int) -> None:
    """Refuse an image larger than ``limit`` pixels from its header, before its pixels are decoded.

    Not permanent: the same bytes decode once the limit is raised (the failure is not remembered)."""
    width, height = size
    if width * height > limit:
        raise ImageDecodeError(f"{path}: image too large ({width} x {height} = {width * height / 1e6:.0f} MP; "
                               f"{_limit_hint()})")


def draft_scale(data: bytes, min_size: Sequence[int] | None) -> int:
    """The factor (1, 2, 4 or 8) by which ``decode_bytes(data, min_size=min_size)`` shrinks the image,
    read from the header alone (nothing is decoded); 1 for bytes that are not a JPEG or not an image."""
    if min_size is None or not data:
        return 1
    try:
        with warnings.catch_warnings():  # the header only: decode_bytes reports what is wrong in it
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return _draft(img, min_size)
    except Exception:  # decode_bytes reports what is wrong with these bytes
        return 1


def draft_description(min_size: Sequence[int]) -> dict[str, Any]:
    """What identifies decoding at reduced scale for ``min_size`` in a cache key (with the decoder id)."""
    return {"method": "jpeg-dct", "min_size": [int(s) for s in min_size], "margin": DRAFT_MARGIN}


def _draft(img: Image.Image, min_size: Sequence[int] | None) -> int:
    """Configure an opened, not yet loaded JPEG to decode at reduced scale; the factor chosen."""
    if min_size is None or not isinstance(img, JpegImagePlugin.JpegImageFile):
        return 1
    height, width = (max(1, math.ceil(DRAFT_MARGIN * int(s))) for s in min_size)
    if img.getexif().get(_ORIENTATION) in _SIDEWAYS:  # draft works on the stored image, before the transpose
        height, width = width, height
    img.draft(None, (width, height))  # Pillow keeps both sides >= the size asked for; 1/1 decodes as usual
    config = getattr(img, "decoderconfig", ())
    return int(config[0]) if config else 1


def quiet_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation (1 = upright, 2-8 = flipped or turned) of an opened image, as Pillow's
    ``getexif`` reads it (EXIF, else XMP), without parsing the rest of the EXIF block and so without
    its warnings, which makes it safe in threads; None when the block is damaged where it matters."""
    raw = img.info.get("exif")
    orientation = _exif_orientation(raw) if isinstance(raw, bytes) else 0
    if orientation != 0:
        return orientation
    xmp = img.info.get("XML:com.adobe.xmp") or img.info.get("xmp")
    match = _XMP_ORIENTATION.search(xmp.encode() if isinstance(xmp, str) else xmp) if xmp else None
    return int(match[2]) if match else 1


def _exif_orientation(raw: bytes) -> int | None:
    """The orientation tag of the first IFD of a raw EXIF block: 0 when absent, None when unreadable."""
    tiff = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    (offset,) = struct.unpack_from(order + "I", tiff, 4)
    if offset + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, offset)
    if offset + 2 + 12 * count > len(tiff):
        return None
    for entry in range(offset + 2, offset + 2 + 12 * count, 12):
        tag, kind, n = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == _ORIENTATION:
            value = struct.unpack_from(order + "H", tiff, entry + 8)[0] if (kind, n) == (3, 1) else 0
            return value if 1 <= value <= 8 else None
    return 0


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
