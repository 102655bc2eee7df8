"""Geometric augmentations: mirror, crops, resize, rotation/shear. Each is one affine sampling matrix.

Example:
    >>> import torch
    >>> from headstart.transforms import RandomResizedCrop
    >>> img = torch.zeros(3, 375, 500, dtype=torch.uint8)
    >>> RandomResizedCrop(224, scale=(0.25, 1.0))(img, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UsageError
from . import functional as F
from ._base import GeometricTransform, Params, check_number, check_range, check_size, jsonable
from .plan import WarpPlan


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An int in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class RandomHorizontalFlip(GeometricTransform):
    """Mirror left-right with probability ``p``.

    Args:
        p: probability of mirroring an image (0 never, 1 always).

    Params:
        ``{"flip": bool}``.
    """

    name = "flip"

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_number(p, "p", 0.0, 1.0)

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        return {"flip": torch.rand(1, generator=generator).item() < self.p}

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        return F.hflip(img) if params["flip"] else img.clone()  # outputs never alias inputs

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        if params["flip"]:
            plan.then_affine(F.hflip_matrix(plan.size[1]), plan.size)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "p": self.p}


class RandomCrop(GeometricTransform):
    """Cut a random ``size`` window, after padding the image by ``padding`` pixels on each side.

    Args:
        size: output ``(height, width)`` (an int for squares).
        padding: pixels added around the image before cropping: one int, ``(left/right, top/bottom)``
            or ``(left, top, right, bottom)``.
        pad_if_needed: pad (evenly) images smaller than ``size`` instead of raising.
        fill: grey level(s) of padded pixels when ``padding_mode`` is ``"constant"``.
        padding_mode: ``"constant"``, ``"edge"`` or ``"symmetric"``.

    Params:
        ``{"top": int, "left": int}``: the window's corner in source pixels (negative inside padding).
    """

    name = "crop"

    def __init__(self, size: int | Sequence[int], padding: int | Sequence[int] = 0, pad_if_needed: bool = True,
                 fill: int | Sequence[int] = 0, padding_mode: str = "constant") -> None:
        super().__init__(fill, padding_mode)
        self.size = check_size(size)
        pads = [padding] if isinstance(padding, int) else list(padding) if isinstance(padding, Sequence) else None
        if pads is None or len(pads) not in (1, 2, 4) or not all(isinstance(p, int) and p >= 0 for p in pads):
            raise UsageError("padding must be a non-negative int, (left/right, top/bottom) or "
                             f"(left, top, right, bottom); got {padding!r}")
        self.padding = tuple(pads * 4 if len(pads) == 1 else pads * 2 if len(pads) == 2 else pads)
        self.pad_if_needed = bool(pad_if_needed)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.size

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        left_pad, top_pad, right_pad, bottom_pad = self.padding
        h, w = self.size
        span_h, span_w = height + top_pad + bottom_pad, width + left_pad + right_pad
        if (span_h < h or span_w < w) and not self.pad_if_needed:
            raise UsageError(f"RandomCrop: the image ({height}x{width} with padding {self.padding}) is smaller "
                             f"than the crop {h}x{w}; pass pad_if_needed=True or a smaller size")
        top_pad += max(0, h - span_h) // 2
        left_pad += max(0, w - span_w) // 2
        u_top, u_left = torch.rand(2, generator=generator).tolist()  # one draw for both: crops are cheap
        top = min(int(u_top * (max(0, span_h - h) + 1)), max(0, span_h - h)) - top_pad
        left = min(int(u_left * (max(0, span_w - w) + 1)), max(0, span_w - w)) - left_pad
        return {"top": top, "left": left}

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        return F.crop(img, params["top"], params["left"], *self.size, fill=self.fill, padding_mode=self.padding_mode)

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        plan.then_affine(F.crop_matrix(params["top"], params["left"]), self.size)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "size": list(self.size), "padding": list(self.padding),
                "pad_if_needed": self.pad_if_needed, **self._padding_config()}


class RandomResizedCrop(GeometricTransform):
    """Cut a random box of ``scale`` times the image's area and aspect ``ratio``, resized to ``size``.

    Ten tries find a box that fits (as in the Inception recipe); else the largest centred box of a
    ratio inside ``ratio``. Resizing is bilinear with antialiasing.

    Args:
        size: output ``(height, width)`` (an int for squares).
        scale: range of the box's area as a fraction of the image's, within ``(0, 1]``.
        ratio: range of the box's width / height (drawn log-uniformly).

    Params:
        ``{"top", "left", "height", "width"}``: the box in source pixels.
    """

    name = "resized_crop"

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        self.size = check_size(size)
        self.scale = check_range(scale, "scale", symmetric=False, low=1e-6, high=1.0)
        self.ratio = check_range(ratio, "ratio", symmetric=False, low=1e-3, high=1e3)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.size

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return {"top": _randint(0, height - h, generator), "left": _randint(0, width - w, generator),
                        "height": h, "width": w}
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])  # fallback: centred box
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        w, h = max(1, min(w, width)), max(1, min(h, height))
        return {"top": (height - h) // 2, "left": (width - w) // 2, "height": h, "width": w}

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        return F.resized_crop(img, params["top"], params["left"], params["height"], params["width"], self.size)

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        box = (params["top"], params["left"], params["height"], params["width"])
        plan.then_affine(F.resized_crop_matrix(*box, self.size), self.size)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "size": list(self.size), "scale": list(self.scale), "ratio": list(self.ratio)}


class ResizeCenterCrop(GeometricTransform):
    """Deterministic: resize the shorter side to cover ``size`` and cut the centre (preset ``none``).

    Args:
        size: output ``(height, width)`` (an int for squares).
    """

    name = "resize"

    def __init__(self, size: int | Sequence[int]) -> None:
        super().__init__()
        self.size = check_size(size)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.size

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        return F.resize_center_crop(img, self.size)

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        box = F.center_box(*plan.size, self.size)
        plan.then_affine(F.resized_crop_matrix(*box, self.size), self.size)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "size": list(self.size)}


class RandomAffine(GeometricTransform):
    """Random rotation, shear, scaling and translation about the image centre; the size is kept.

    Args:
        degrees: rotation range in degrees (counter-clockwise on screen); ``d`` means ``(-d, d)``.
        translate: largest shift as a fraction of width and height, ``(fx, fy)`` in ``[0, 1]``.
        scale: range of the zoom factor (``(1, 1)``: none).
        shear: degrees; ``s`` means x-shear in ``(-s, s)``; ``(a, b)`` an x range;
            ``(a, b, c, d)`` x range ``(a, b)`` and y range ``(c, d)``. Within ``(-80, 80)``.
        fill: grey level(s) of pixels that come from outside the image (``padding_mode="constant"``).
        padding_mode: ``"constant"``, ``"edge"`` or ``"symmetric"``.

    Params:
        ``{"angle": float, "translate": [tx, ty] (pixels), "scale": float, "shear": [sx, sy]}``.
    """

    name = "affine"

    def __init__(self, degrees: float | Sequence[float] = 0.0, translate: Sequence[float] = (0.0, 0.0),
                 scale: Sequence[float] = (1.0, 1.0), shear: float | Sequence[float] = 0.0,
                 fill: int | Sequence[int] = 0, padding_mode: str = "constant") -> None:
        super().__init__(fill, padding_mode)
        self.degrees = check_range(degrees, "degrees", low=-360.0, high=360.0)
        if not isinstance(translate, Sequence) or len(translate) != 2:
            raise UsageError(f"translate must be (fx, fy) fractions of width and height; got {translate!r}")
        self.translate = (check_number(translate[0], "translate[0]", 0.0, 1.0),
                          check_number(translate[1], "translate[1]", 0.0, 1.0))
        self.scale = check_range(scale, "scale", symmetric=False, low=1e-3, high=1e3)
        if isinstance(shear, Sequence) and not isinstance(shear, str) and len(shear) == 4:
            self.shear = (*check_range(shear[:2], "shear x", low=-80, high=80),
                          *check_range(shear[2:], "shear y", low=-80, high=80))
        else:
            self.shear = (*check_range(shear, "shear", low=-80, high=80), 0.0, 0.0)

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        u = torch.rand(6, generator=generator).tolist()

        def pick(low: float, high: float, v: float) -> float:
            return low + (high - low) * v

        return {"angle": pick(*self.degrees, u[0]),
                "translate": [pick(-self.translate[0], self.translate[0], u[1]) * width,
                              pick(-self.translate[1], self.translate[1], u[2]) * height],
                "scale": pick(*self.scale, u[3]),
                "shear": [pick(*self.shear[:2], u[4]), pick(*self.shear[2:], u[5])]}

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        h, w = plan.size
        m = F.affine_matrix(params["angle"], params["translate"], params["scale"], params["shear"], (w / 2, h / 2))
        plan.then_affine(m, plan.size)

    def get_config(self) -> dict[str, Any]:
        return jsonable({"name": self.name, "degrees": self.degrees, "translate": self.translate,
                         "scale": self.scale, "shear": self.shear, **self._padding_config()})
