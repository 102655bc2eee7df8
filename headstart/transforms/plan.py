"""A chain of geometric transforms as one map from output pixels to source pixels, rendered once.

Crops, resizes, flips, rotations, shears and translations are affine maps, so any chain of them is
one 3x3 matrix; local warps add a displacement field. :class:`WarpPlan` composes them as they
come (each new transform's map is applied *before* the ones already in the plan, since sampling
maps go from output to source) and :meth:`WarpPlan.render` draws the result with one resample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import functional


class WarpPlan:
    """Where each output pixel samples the source: ``src = matrix @ (x, y, 1) + displacement[:, y, x]``.

    Args:
        source_size: ``(height, width)`` of the source image.

    Attributes:
        size: ``(height, width)`` of the current output.
        matrix: 3x3 float64 sampling matrix, output coordinates -> source coordinates.
        displacement: ``(2, height, width)`` float32 field (x, y) in source pixels, or None.

    Example:
        >>> plan = WarpPlan((100, 200))
        >>> plan.then_affine(functional.hflip_matrix(200), (100, 200))
        >>> plan.render(torch.zeros(3, 100, 200, dtype=torch.uint8)).shape
        torch.Size([3, 100, 200])
    """

    __slots__ = ("displacement", "matrix", "size", "source_size")

    def __init__(self, source_size: Sequence[int]) -> None:
        self.source_size = (int(source_size[0]), int(source_size[1]))
        self.size = self.source_size
        self.matrix = np.eye(3)
        self.displacement: torch.Tensor | None = None

    def then_affine(self, sampling: np.ndarray, size: Sequence[int]) -> None:
        """Follow the plan with an affine map; ``sampling`` maps the new output to the current output."""
        size = (int(size[0]), int(size[1]))
        if self.displacement is not None:
            self.displacement = _resample(self.displacement, _affine_coords(sampling, size))
        self.matrix = self.matrix @ sampling
        self.size = size

    def then_displacement(self, field: torch.Tensor) -> None:
        """Follow the plan with a local warp: output pixel ``p`` samples the current output at ``p + field[:, p]``.

        Args:
            field: ``(2, height, width)`` x and y displacements in pixels of the current output.
        """
        (a, b), (c, d) = self.matrix[:2, :2].tolist()
        if b == 0.0 and c == 0.0:  # axis-aligned so far (crops, resizes, flips): scale each component
            moved = field if a == 1.0 and d == 1.0 else field * torch.tensor([a, d]).view(2, 1, 1)
        else:  # src = M (p + d) = M p + L d
            moved = torch.stack([torch.add(field[0] * a, field[1], alpha=b),
                                 torch.add(field[0] * c, field[1], alpha=d)])
        if self.displacement is not None:
            moved = moved + _resample(self.displacement, functional.pixel_centres(self.size) + field)
        self.displacement = moved

    def render(self, img: torch.Tensor, offset: torch.Tensor | None = None, fill: int | Sequence[int] = 0,
               padding_mode: str = "constant") -> torch.Tensor:
        """Draw the plan from ``img`` (uint8 ``(C, H, W)`` or ``(N, C, H, W)``); see :func:`functional.warp`."""
        return functional.warp(img, self.matrix, self.size, displacement=self.displacement, offset=offset,
                               fill=fill, padding_mode=padding_mode)


def _affine_coords(sampling: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``(2, h, w)`` coordinates that the pixel centres of a ``size`` output map to under ``sampling``."""
    (a, b, tx), (c, d, ty) = sampling[:2].tolist()
    centres = functional.pixel_centres(size)
    return torch.stack([centres[0] * a + centres[1] * b + tx, centres[0] * c + centres[1] * d + ty])


def _resample(field: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear value of a ``(2, h, w)`` field at pixel coordinates ``coords`` ``(2, h', w')``; edges extend."""
    h, w = field.shape[1:]
    grid = torch.stack([coords[0] * (2.0 / w) - 1.0, coords[1] * (2.0 / h) - 1.0], dim=-1)[None]
    out = F.grid_sample(field[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0]
