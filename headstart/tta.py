"""Test-time multi-crop geometry: which crops of each image are views, and how each is cut.

The geometry is the backbone's own evaluation transform (timm ``create_transform(is_training=False)``):
resize so the shorter side is ``scale_size = floor(S / crop_pct)`` (``S`` the input size), then crop
``S x S``. The modes add crops of that same resized image:

=============  ======================================================================================
mode           views, in order (view 0 is always the plain centre crop, the clean view)
=============  ======================================================================================
``none``       centre
``flip``       centre, mirrored centre
``5crop``      centre, top-left, top-right, bottom-left, bottom-right
``10crop``     the 5 crops above, then the mirror of each of them in the same order
``multiscale`` centre crops of the image resized to ``scale_size * s`` for ``s`` = 1.0, 0.875, 1.143
               (:data:`SCALES`; the shorter side is 256, 224, 293 px for a 224 px backbone with
               ``crop_pct`` 0.875: the usual view, a crop that sees the whole shorter side, and a
               closer one; never smaller than the crop), then their mirrors in the same order (6 views)
=============  ======================================================================================

A view's cache key describes what the crop *is* (position, mirror, scale), not which mode asked for it,
so the mirrored centre of ``flip`` and of ``10crop`` share cached features, and the centre view uses the
clean view's key and so reuses the features that :func:`~headstart.features.extract_features` cached.

Example:
    >>> views = tta_views(backbone.data_config, "10crop")                        # doctest: +SKIP
    >>> result = extract_views(backbone, paths, views, cache=cache)              # doctest: +SKIP
    >>> proba = predict_proba_views(head, result.features[result.ok])            # doctest: +SKIP

Scoring and view averaging belong to :mod:`headstart.inference`. For many images, leave the features
in the cache and score them where they lie (what ``evaluate`` and ``predict`` do; memory stays
bounded whatever the number of crops):

    >>> result = extract_views(backbone, paths, views, cache=cache, load=False)  # doctest: +SKIP
    >>> proba = predict_proba_cached(head, cache, result)                        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._constants import TTA_AVERAGES, TTA_MODES  # noqa: F401  (TTA_MODES: also importable from here)
from ._validation import check_tta_mode
from .errors import UsageError
from .features import View
from .preprocess import eval_transform, resize_size

#: Shorter-side factors (relative to the eval resize) of the ``multiscale`` mode.
SCALES = (0.875, 1.0, 1.143)
POSITIONS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
AVERAGE_METHODS = TTA_AVERAGES
#: Bump when the crop geometry changes in a way that changes pixel values (it is in every crop's cache key).
TTA_VERSION = 1


@dataclass(frozen=True)
class Crop:
    """One test-time view: where the crop sits, whether it is mirrored, and the resize scale."""

    position: str  # one of POSITIONS, in the resized image
    flip: bool  # mirror the crop left-right
    scale: float = 1.0  # shorter side = scale * the eval transform's scale_size

    @property
    def is_clean(self) -> bool:
        """True for the plain centre crop, which is exactly the backbone's eval transform."""
        return self.position == "center" and not self.flip and self.scale == 1.0

    def description(self) -> dict[str, Any]:
        """The view description that goes into the cache key."""
        if self.is_clean:
            return {"view": "clean"}
        return {"view": "tta", "crop": self.position, "flip": self.flip, "scale": self.scale,
                "version": TTA_VERSION}


def _check_mode(mode: str) -> None:
    check_tta_mode(mode, "tta mode")


def tta_crops(mode: str) -> list[Crop]:
    """The crops of a TTA mode, in view order (see the module docstring); the first is the clean centre."""
    _check_mode(mode)
    if mode == "none":
        return [Crop("center", False)]
    if mode == "flip":
        return [Crop("center", False), Crop("center", True)]
    if mode == "multiscale":
        return [Crop("center", flip, s) for flip in (False, True) for s in sorted(SCALES, key=lambda s: s != 1.0)]
    five = [Crop(p, False) for p in POSITIONS]
    return five if mode == "5crop" else five + [Crop(c.position, True) for c in five]


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise UsageError(f"{name} must be a positive int or an (height, width) pair; got {size!r}")
    return pair  # type: ignore[return-value]


def crop_box(resized_hw: tuple[int, int], crop: int | tuple[int, int], position: str) -> tuple[int, int]:
    """``(top, left)`` of a crop of size ``crop`` at ``position`` in an image of size ``resized_hw``.

    The centre is placed exactly as torchvision's ``center_crop`` places it,
    ``top = int(round((H - h) / 2))`` (Python's round-half-to-even), so the centre crop is the eval
    transform's crop; corners touch the image's edges. The image must be at least as large as the crop.
    """
    (height, width), (h, w) = _pair(resized_hw, "resized_hw"), _pair(crop, "crop")
    if h > height or w > width:
        raise UsageError(f"a {h}x{w} crop does not fit in a {height}x{width} image")
    if position == "center":
        return round((height - h) / 2.0), round((width - w) / 2.0)  # round() of a float is an int
    if position not in POSITIONS:
        raise UsageError(f"crop position must be one of {', '.join(POSITIONS)}; got {position!r}")
    vertical, horizontal = position.split("_")
    return (0 if vertical == "top" else height - h), (0 if horizontal == "left" else width - w)


def crop_boxes(resized_hw: tuple[int, int], crop: int | tuple[int, int], mode: str) -> list[tuple[int, int, bool]]:
    """The boxes of a single-scale TTA mode, in view order.

    Args:
        resized_hw: ``(height, width)`` of the image after the eval resize (shorter side ``scale_size``).
        crop: crop size ``S`` (or ``(h, w)``).
        mode: ``none``, ``flip``, ``5crop`` or ``10crop``.

    Returns:
        ``[(top, left, flip), ...]``: view ``i`` is the pixels ``[top:top+h, left:left+w]`` of the resized
        image, mirrored left-right when ``flip``. For ``10crop`` the last five are the first five mirrored.

    Example:
        >>> crop_boxes((256, 341), 224, "5crop")
        [(16, 58, False), (0, 0, False), (0, 117, False), (32, 0, False), (32, 117, False)]
    """
    _check_mode(mode)
    if mode == "multiscale":
        raise UsageError("multiscale crops come from differently resized images, so one resized size cannot "
                         "place them; use tta_crops('multiscale') and crop_box() with each scale's size")
    return [(*crop_box(resized_hw, crop, c.position), c.flip) for c in tta_crops(mode)]


def _supports_crops(data_config: dict[str, Any]) -> bool:
    return data_config.get("crop_mode") != "border"


def _resize_step(data_config: dict[str, Any], scale: float):
    """The eval transform's resize (before its crop), with the target scaled by ``scale`` for multiscale."""
    from timm.data.transforms import ResizeKeepRatio, str_to_interp_mode
    from torchvision import transforms

    scale_size = resize_size(data_config, scale)  # never smaller than the crop, so every crop fits
    interpolation = data_config.get("interpolation", "bilinear")
    if data_config.get("crop_mode") == "squash":
        return transforms.Resize(scale_size, interpolation=str_to_interp_mode(interpolation))
    if scale_size[0] == scale_size[1]:  # shorter side -> scale_size, as timm's centre mode does
        return transforms.Resize(scale_size[0], interpolation=str_to_interp_mode(interpolation))
    return ResizeKeepRatio(scale_size, interpolation=interpolation)


def _pad_to(image: Image.Image, h: int, w: int) -> Image.Image:
    """Zero-pad an image smaller than the crop as torchvision's ``center_crop`` does (crop_pct > 1)."""
    width, height = image.size
    if width >= w and height >= h:
        return image
    left, top = max(0, (w - width) // 2), max(0, (h - height) // 2)
    padded = Image.new(image.mode, (max(width, w), max(height, h)))
    padded.paste(image, (left, top))
    return padded


class _ResizeMemo:
    """The resized, normalised image of the last image seen, per scale, shared by the views of one mode.

    All views of an image are made one after the other in one process, so they resize it once. The memo
    is emptied on pickling (each DataLoader worker starts empty); identity is kept, so the views of a
    pickled dataset still share one memo.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.tensors: dict[float, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"key": None, "tensors": {}}


class TTATransform:
    """View ``index`` of a TTA ``mode``: decoded RGB image (+ content key) -> normalised float ``(3, S, S)``.

    Has the interface of :class:`~headstart.features.CleanTransform`, so it plugs into
    :class:`~headstart.features.View`. View 0 (the centre) is bit for bit the backbone's eval transform.

    Args:
        data_config: the backbone's timm data config (input_size, crop_pct, crop_mode, interpolation,
            mean, std).
        mode: one of :data:`TTA_MODES`.
        index: which of the mode's views (``0 <= index < len(tta_crops(mode))``).
        memo: a resize memo shared with the other views of the mode (made by :func:`tta_views`).
    """

    def __init__(self, data_config: dict[str, Any], mode: str, index: int, memo: _ResizeMemo | None = None) -> None:
        crops = tta_crops(mode)
        if not (isinstance(index, int) and 0 <= index < len(crops)):
            raise UsageError(f"tta mode '{mode}' has views 0..{len(crops) - 1}; got index {index!r}")
        self.crop = crops[index]
        if not _supports_crops(data_config) and not self.crop.is_clean:
            raise UsageError(f"tta mode '{mode}' needs a backbone whose eval crop_mode is 'center' or 'squash'; "
                             f"this one uses '{data_config.get('crop_mode')}' (use tta mode 'none')")
        self.data_config = data_config
        self.mode = mode
        self.index = index
        self.size = tuple(int(s) for s in data_config["input_size"][1:])
        self.mean = [float(m) for m in data_config["mean"]]
        self.std = [float(s) for s in data_config["std"]]
        self.memo = memo if memo is not None else _ResizeMemo()
        self._resize = None
        self._fallback = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_resize": None, "_fallback": None}

    def _resized(self, image: Image.Image, image_key: str) -> torch.Tensor:
        """The image resized at this crop's scale, padded to the crop if smaller, as a normalised tensor."""
        from torchvision.transforms import functional as F

        key = (image_key, image.size, image.mode)
        memo = self.memo
        if image_key and memo.key == key and self.crop.scale in memo.tensors:
            return memo.tensors[self.crop.scale]
        if self._resize is None:
            self._resize = _resize_step(self.data_config, self.crop.scale)
        resized = _pad_to(self._resize(image), *self.size)
        # to_tensor and normalize are elementwise, so cropping after them equals timm's crop-then-normalise
        tensor = F.normalize(F.to_tensor(resized), self.mean, self.std)
        if image_key:
            if memo.key != key:
                memo.key, memo.tensors = key, {}
            memo.tensors[self.crop.scale] = tensor
        return tensor

    def __call__(self, image: Image.Image, image_key: str) -> torch.Tensor:
        if not _supports_crops(self.data_config):  # border mode: only the clean view exists
            if self._fallback is None:
                self._fallback = eval_transform(self.data_config)
            return self._fallback(image)
        full = self._resized(image, image_key)
        h, w = self.size
        top, left = crop_box(tuple(full.shape[-2:]), (h, w), self.crop.position)
        out = full[:, top:top + h, left:left + w]
        return out.flip(-1) if self.crop.flip else out.clone()  # a copy: the memo must stay untouched


def tta_views(data_config: dict[str, Any], mode: str, draft: bool = True) -> list[View]:
    """The views of a TTA mode for :func:`~headstart.features.extract_views`, centre first.

    The centre view's description is ``{"view": "clean"}`` (it shares the clean feature cache); every
    other view's is ``{"view": "tta", "crop": position, "flip": bool, "scale": s, "version": 1}``, so a
    crop has one cache entry whichever mode asks for it. All views share one resize memo, so an image
    is resized once per scale for all its crops.

    With ``draft`` (as :func:`~headstart.views.clean_view`), each view asks the decoder for at least its
    own scale's resize size, so a large JPEG is decoded at reduced scale with enough pixels for it.
    """
    memo = _ResizeMemo()
    return [View(TTATransform(data_config, mode, i, memo), crop.description(),
                 resize_size(data_config, crop.scale) if draft else None)
            for i, crop in enumerate(tta_crops(mode))]
