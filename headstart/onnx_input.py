"""The input of an exported model: how an image file becomes its uint8 ``3 x H x W`` array.

An exported graph (:mod:`headstart.export`) takes uint8 RGB images, ``N x 3 x H x W``; normalisation
happens inside it. Resizing and cropping happen outside, in :func:`prepare_image`: a reference in
Pillow and numpy only (no torch), which the model card quotes and ``headstart serve`` uses. It gives
the pixels the run's own evaluation transform (timm, torchvision on Pillow) gives, value for value:

* the EXIF orientation is applied; transparency is composited on white; any mode becomes RGB;
* a large JPEG is decoded at reduced scale by its DCT, keeping both sides at least twice the resize
  size (as headstart's decoder does);
* ``center`` crop mode: the shorter side is resized to ``resize`` (the longer one in proportion,
  truncated), ``squash``: both sides are; with the run's interpolation (antialiased, Pillow's);
* then the centre ``size`` crop, its corner at ``round((resized - size) / 2)`` (round half to even).

With ``--tta 10crop`` the graph cuts its 10 crops itself, so the input is the whole resized image
(``"crop": false``: shorter side ``resize``, any longer side; a batch holds images of one shape).

The *input spec* is a plain JSON-able dict, stored in the ONNX file's metadata (``headstart.input``)::

    {"size": [224, 224], "resize": [256, 256], "crop_mode": "center", "crop": true,
     "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "NCHW", "dtype": "uint8"}

``mean``/``std`` are informational: the graph applies them to ``pixels / 255``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageOps

#: Pillow filters for timm's interpolation names.
FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def input_spec(data_config: dict[str, Any], crop: bool = True) -> dict[str, Any]:
    """The input spec of a run with timm ``data_config``; ``crop=False`` for a graph that crops itself (10crop).

    Raises:
        ValueError: the preprocessing cannot be reproduced by :func:`prepare_image` (``border`` crop
            mode, a non-square input in ``center`` mode, a resize smaller than the crop, an unknown
            interpolation); the message names the setting.
    """
    size = [int(s) for s in data_config["input_size"][1:]]
    crop_pct = data_config.get("crop_pct") or 0.875  # timm's default when the config has none
    resize = [math.floor(s / crop_pct) for s in size]
    mode = data_config.get("crop_mode") or "center"
    interpolation = data_config.get("interpolation") or "bilinear"
    if mode not in ("center", "squash") or (mode == "center" and size[0] != size[1]):
        raise ValueError(f"crop_mode '{mode}' with input size {size} is not supported by the export's reference "
                         "preprocessing (centre or squash crops of a square input only)")
    if min(r - s for r, s in zip(resize, size)) < 0:
        raise ValueError(f"crop_pct {crop_pct} > 1 (resize {resize} smaller than the crop {size}) is not supported "
                         "by the export's reference preprocessing")
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation '{interpolation}' is not one of {', '.join(FILTERS)}")
    return {"size": size, "resize": resize, "crop_mode": mode, "crop": bool(crop), "interpolation": interpolation,
            "mean": [float(m) for m in data_config["mean"]], "std": [float(s) for s in data_config["std"]],
            "layout": "NCHW", "dtype": "uint8"}


def prepare_image(source: Any, spec: dict[str, Any]) -> np.ndarray:
    """An image file (path or binary file object) or PIL image -> the model's uint8 input ``(3, H, W)``."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    (rh, rw), (h, w) = spec["resize"], spec["size"]
    image.draft(None, (2 * rw, 2 * rh))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that is enough
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":  # palette, grey, alpha ...: composite on white
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), rgba).convert("RGB")
    width, height = image.size
    if spec["crop_mode"] == "squash":
        width, height = rw, rh
    elif width <= height:  # the shorter side -> resize, the longer in proportion (truncated)
        width, height = rw, int(rw * height / width)
    else:
        width, height = int(rh * width / height), rh
    if (width, height) != image.size:
        image = image.resize((width, height), FILTERS[spec["interpolation"]])
    if spec["crop"]:
        top, left = round((height - h) / 2), round((width - w) / 2)
        image = image.crop((left, top, left + w, top + h))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
