"""Local warps: elastic deformation and grid distortion, smooth and with a hard bound on displacement.

Both draw a few random numbers on a coarse grid and turn them into a dense displacement field with
cheap separable interpolation; the image is then resampled once (fused with any crop or rotation
in a pipeline). Every pixel moves by at most the documented bound, so a labelled object stays where
it was, give or take that many pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UsageError
from . import functional as F
from ._base import GeometricTransform, Params, check_number
from .plan import WarpPlan


class ElasticWarp(GeometricTransform):
    """Elastic deformation: random displacements on a coarse grid, smoothed by a cubic B-spline.

    Unlike torchvision's ``ElasticTransform`` (Gaussian-blurred per-pixel noise), the field comes
    from one random displacement per control point ``sigma`` pixels apart, which is about as smooth
    and two orders of magnitude cheaper.

    Args:
        alpha: largest displacement in pixels, per axis; no pixel moves further than ``alpha`` in x
            or in y (control displacements are uniform in ``[-alpha, alpha]`` and the B-spline
            is a weighted average of them).
        sigma: smoothness: spacing of the control points in pixels (the size of the wobbles).
        fill: grey level(s) of pixels pulled in from outside the image (``padding_mode="constant"``).
        padding_mode: ``"constant"``, ``"edge"`` or ``"symmetric"``.

    Params:
        ``{"control": tensor (2, gh, gw)}``: x and y displacements at the control points, in pixels.

    Example:
        >>> import torch
        >>> img = torch.zeros(3, 224, 224, dtype=torch.uint8)
        >>> ElasticWarp(alpha=6, sigma=40)(img, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3, 224, 224])
    """

    name = "elastic"

    def __init__(self, alpha: float = 5.0, sigma: float = 32.0, fill: int | Sequence[int] = 0,
                 padding_mode: str = "constant") -> None:
        super().__init__(fill, padding_mode)
        self.alpha = check_number(alpha, "alpha", 0.0, 1e4)
        self.sigma = check_number(sigma, "sigma", 1.0, 1e6)

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        spans_y = max(1, round(height / self.sigma))
        spans_x = max(1, round(width / self.sigma))
        u = torch.rand(2, spans_y + 3, spans_x + 3, generator=generator)
        return {"control": (u * 2.0 - 1.0) * self.alpha}

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        if self.alpha > 0:
            plan.then_displacement(F.bspline_field(params["control"], plan.size))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "sigma": self.sigma, **self._padding_config()}


class GridDistortion(GeometricTransform):
    """Grid distortion: cut the image into ``steps x steps`` cells and move the interior grid lines.

    Each interior vertical (horizontal) line samples the source up to ``limit`` cells to the left or
    right (up or down); in between, the map is linear, and the borders stay put.

    Args:
        steps: cells per side (>= 2).
        limit: largest move of a grid line as a fraction of a cell, in ``[0, 0.5)``; below 0.5 the
            pixel order is kept (no folds). No pixel moves more than ``limit * width / steps`` in x
            (``limit * height / steps`` in y).
        fill: grey level(s) of pixels pulled in from outside the image (``padding_mode="constant"``).
        padding_mode: ``"constant"``, ``"edge"`` or ``"symmetric"``.

    Params:
        ``{"x_shifts": tensor (steps - 1,), "y_shifts": tensor (steps - 1,)}`` in cells.
    """

    name = "grid_distortion"

    def __init__(self, steps: int = 5, limit: float = 0.3, fill: int | Sequence[int] = 0,
                 padding_mode: str = "constant") -> None:
        super().__init__(fill, padding_mode)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 1024:
            raise UsageError(f"steps must be an int from 2 to 1024 (cells per side); got {steps!r}")
        self.steps = steps
        self.limit = check_number(limit, "limit", 0.0, 0.4999)

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        u = (torch.rand(2, self.steps - 1, generator=generator) * 2.0 - 1.0) * self.limit
        return {"x_shifts": u[0], "y_shifts": u[1]}

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        if self.limit > 0:
            plan.then_displacement(F.grid_distortion_field(params["x_shifts"], params["y_shifts"], plan.size))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "limit": self.limit, **self._padding_config()}
